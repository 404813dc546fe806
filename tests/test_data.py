"""The data package: tokenizer loading, shard preparation, the token loader, HellaSwag scoring.

Everything runs offline on CPU. Tests that need the real GPT-2 tokenizer or tiny Shakespeare take
them from ../shared/data beside the repository and skip cleanly when it is absent.
"""
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch
import torch.nn.functional as F

from tritongpt.data import hellaswag, prepare, tokenizer
from tritongpt.data.loader import EOT, TokenLoader


# ----------------------------------------------------------------------------------------------
# the loader


def make_shards(sizes, seed=0, eot=EOT):
    """Shards of distinct documents (EOT, then k+1 repeated), shard i holding sizes[i] documents.

    The second shard starts with a fragment without EOT (as a shard cut inside a document is).
    """
    rng = np.random.default_rng(seed)
    shards, k = [], 0
    for i, n in enumerate(sizes):
        parts = [np.full(3, 60000 + i, dtype=np.uint16)] if i == 1 else []
        for _ in range(n):
            k += 1
            parts.append(np.array([eot] + [k] * int(rng.integers(1, 9)), dtype=np.uint16))
        shards.append(np.concatenate(parts))
    return shards


def stream_of(loader, steps):
    """The tokens a world_size=1 loader streams over `steps` batches, in order (x rows are contiguous)."""
    return np.concatenate([loader.next_batch()[0].reshape(-1).numpy() for _ in range(steps)])


def documents(tokens, eot=EOT):
    """Split at EOT tokens and where a shard's leading fragment (tokens >= 60000) begins."""
    def starts(i):
        return tokens[i] == eot or (tokens[i] >= 60000 and tokens[i - 1] != tokens[i])
    cuts = [0] + [i for i in range(1, len(tokens)) if starts(i)] + [len(tokens)]
    return [tuple(tokens[a:b].tolist()) for a, b in zip(cuts, cuts[1:])]


def test_each_epoch_is_a_shuffle_of_whole_documents():
    shards = make_shards([12, 5, 30, 1])
    n = sum(len(s) for s in shards)
    loader = TokenLoader(shards, batch_size=3, seq_len=7, seed=1)
    stream = stream_of(loader, 2 * n // 21 + 1)
    plain = np.concatenate(shards)
    epochs = [stream[:n], stream[n:2 * n]]
    for tokens in epochs:
        # every document exactly once and never cut: the same multiset of documents; the leading
        # fragment of shard 1 stays a document of its own
        assert sorted(documents(tokens)) == sorted(documents(plain))
        assert not np.array_equal(tokens, plain)
    assert not np.array_equal(epochs[0], epochs[1])  # the epoch number seeds the shuffle
    assert loader.epoch == 2


def test_targets_are_inputs_shifted_by_one():
    loader = TokenLoader(make_shards([20, 20]), batch_size=4, seq_len=5, seed=3)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 5) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:-1, -1], x[1:, 0])  # rows are consecutive windows of the stream
    x2, _ = loader.next_batch()
    assert y[-1, -1] == x2[0, 0]


def test_same_seed_same_stream_other_seed_other_stream():
    shards = make_shards([15, 15, 15])
    a, b, c = (stream_of(TokenLoader(shards, 2, 8, seed=s), 10) for s in (5, 5, 6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shuffle_off_reads_shards_in_order():
    shards = make_shards([4, 3, 6])
    plain = np.concatenate(shards)
    stream = stream_of(TokenLoader(shards, 2, 5, shuffle=False), 2 * len(plain) // 10 + 1)
    assert np.array_equal(stream[:len(plain)], plain)
    assert np.array_equal(stream[len(plain):2 * len(plain)], plain)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_one_process_stream(world_size):
    # shards shorter than a batch: batches straddle documents, shards and epochs
    shards = make_shards([2, 1, 3, 2])
    batch, seq = 2, 4
    ranks = [TokenLoader(shards, batch, seq, rank=r, world_size=world_size, seed=7) for r in range(world_size)]
    whole = TokenLoader(shards, batch * world_size, seq, seed=7)
    for _ in range(12):
        xs, ys = zip(*(r.next_batch() for r in ranks))
        x, y = whole.next_batch()
        assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)


def test_state_dict_resumes_exactly_on_every_rank():
    shards = make_shards([9, 4, 11])
    def fresh(rank):
        return TokenLoader(shards, 3, 6, rank=rank, world_size=2, seed=11)
    original = [fresh(0), fresh(1)]
    for _ in range(5):
        for loader in original:
            loader.next_batch()
    state = json.loads(json.dumps(original[0].state_dict()))  # JSON-able; rank 0's copy serves all
    assert state == original[1].state_dict()
    restored = [fresh(0), fresh(1)]
    for loader in restored:
        loader.load_state_dict(state)
    for _ in range(8):  # far enough to cross into the next epoch
        for a, b in zip(original, restored):
            xa, ya = a.next_batch()
            xb, yb = b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert restored[0].epoch >= 1


def test_state_from_other_data_is_refused():
    loader = TokenLoader(make_shards([5, 5]), 2, 4, seed=1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(make_shards([5, 5]), 2, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens"):
        TokenLoader(make_shards([5, 6]), 2, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict(dict(state, position=state["num_tokens"]))


def test_in_memory_array_with_its_own_separator():
    # train.py's offline demo: bytes, with b"\n" (10) as the document separator
    data = np.frombuffer(b"\nalpha beta\ngamma\ndelta epsilon zeta\neta", dtype=np.uint8)
    loader = TokenLoader([data], batch_size=1, seq_len=len(data), seed=0, eot=10)
    x, y = loader.next_batch()
    assert sorted(documents(x[0].numpy(), eot=10)) == sorted(documents(data, eot=10))
    assert y[0, -1] == loader.next_batch()[0][0, 0]
    as_tensor = TokenLoader([torch.tensor(data.tolist())], batch_size=1, seq_len=len(data), seed=0, eot=10)
    assert torch.equal(as_tensor.next_batch()[0], x)  # a CPU tensor works as an array does


def test_from_dir_memory_maps_the_split(tmp_path):
    shards = make_shards([3, 4, 5])
    np.save(tmp_path / "toy_val_000000.npy", shards[0])
    np.save(tmp_path / "toy_train_000001.npy", shards[1])
    np.save(tmp_path / "toy_train_000002.npy", shards[2])
    loader = TokenLoader.from_dir(tmp_path, "train", 2, 3, shuffle=False)
    assert all(isinstance(s, np.memmap) for s in loader.shards)
    assert loader.num_tokens == len(shards[1]) + len(shards[2])
    assert np.array_equal(stream_of(loader, 1), np.concatenate(shards[1:])[:6])
    with pytest.raises(FileNotFoundError, match="python -m tritongpt.data.prepare"):
        TokenLoader.from_dir(tmp_path / "missing", "train", 2, 3)


@pytest.mark.parametrize("kwargs, error", [
    (dict(batch_size=0), ValueError), (dict(seq_len=-1), ValueError), (dict(rank=2, world_size=2), ValueError),
    (dict(world_size=0), ValueError), (dict(seed=-1), ValueError), (dict(seed=2**32), ValueError),
    (dict(batch_size=2.0), TypeError), (dict(shards=[]), ValueError), (dict(shards=[np.zeros((2, 3), int)]), ValueError),
    (dict(shards=[np.zeros(5, np.float32)]), TypeError), (dict(shards=[np.zeros(0, int)]), ValueError),
    (dict(shards=[3]), TypeError),
])
def test_bad_arguments_name_the_argument(kwargs, error):
    args = dict(shards=[np.arange(50)], batch_size=2, seq_len=4)
    args.update(kwargs)
    name = next(iter(kwargs))
    with pytest.raises(error, match=name if name != "shards" else "shards"):
        TokenLoader(**args)


# ----------------------------------------------------------------------------------------------
# the tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def gpt2_dir(monkeypatch):
    """A tokenizer folder for GPT-2 from ../shared/data (or None with TIKTOKEN_CACHE_DIR set to
    the shared tiktoken cache instead); skips when neither holds the real files."""
    monkeypatch.delenv("TRITONGPT_TOKENIZER_DIR", raising=False)
    if all((SHARED / "gpt2" / name).is_file() for name in tokenizer.FILES):
        return str(SHARED / "gpt2")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
    if tokenizer._cached_files() is None:
        pytest.skip("GPT-2 tokenizer files not found in ../shared/data")
    return None


def no_download():
    raise ConnectionError("no network in this test")


def tiny_tokenizer(folder, merges=(("t", "h"), ("th", "e"), ("Ġ", "the"))):
    """A GPT-2-format tokenizer with the 256 bytes (id = byte value) and a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = tokenizer.byte_symbols()
    encoder = {symbols[b]: b for b in range(256)}
    for i, (left, right) in enumerate(merges):
        encoder[left + right] = 256 + i
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(folder)


def test_tokenizer_from_local_folder_is_gpt2(gpt2_dir, monkeypatch):
    if gpt2_dir is None:
        pytest.skip("only the tiktoken cache is available")
    monkeypatch.setattr(tokenizer, "_download", no_download)
    enc = tokenizer.gpt2_encoding(gpt2_dir)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == tokenizer.EOT
    # the ranks equal what tiktoken's own loader makes of the same files
    vocab, encoder = str(Path(gpt2_dir) / "vocab.bpe"), str(Path(gpt2_dir) / "encoder.json")
    ours = tokenizer.ranks_from_files(encoder, vocab)
    try:
        theirs = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab, encoder)
    except ImportError:  # older tiktoken reads local files only through blobfile
        pytest.skip("this tiktoken needs blobfile to read local files")
    assert ours == theirs
    monkeypatch.setenv("TRITONGPT_TOKENIZER_DIR", gpt2_dir)
    assert tokenizer.gpt2_encoding().encode(" the cat") == enc.encode(" the cat")


def test_tokenizer_from_tiktoken_cache_without_network(gpt2_dir, tmp_path, monkeypatch):
    if gpt2_dir is not None:  # make a cache the way tiktoken names it: sha1 of the URL
        for name in tokenizer.FILES:
            key = hashlib.sha1(tokenizer.URLS[name].encode()).hexdigest()
            shutil.copy(Path(gpt2_dir) / name, tmp_path / key)
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokenizer, "_download", no_download)
    assert tokenizer.gpt2_encoding().encode("Hello world") == [15496, 995]


def test_tokenizer_error_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITONGPT_TOKENIZER_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # a cached file that is not GPT-2's (wrong sha256) is not used
    (tmp_path / hashlib.sha1(tokenizer.URLS["vocab.bpe"].encode()).hexdigest()).write_text("junk")
    monkeypatch.setattr(tokenizer, "_download", no_download)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR") as info:
        tokenizer.gpt2_encoding()
    assert "encoder.json" in str(info.value) and "vocab.bpe" in str(info.value)
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        tokenizer.gpt2_encoding(str(tmp_path))


def test_tokenizer_files_must_agree(tmp_path):
    enc = tokenizer.gpt2_encoding(tiny_tokenizer(tmp_path / "ok"))
    assert enc.encode("the") == [257] and enc.encode(" the") == [258]
    assert enc.decode([258, 33]) == " the!"
    bad = tiny_tokenizer(tmp_path / "bad")
    (Path(bad) / "vocab.bpe").write_text("#version: 0.2\nth e\nt h\nĠ the\n", encoding="utf-8")
    with pytest.raises(ValueError, match="disagree"):
        tokenizer.gpt2_encoding(bad)


# ----------------------------------------------------------------------------------------------
# preparation

WORDS = "the thin theme then other thesis tooth their three breathe the".split()


def passages(count, seed=0):
    """Text made by the test: `count` passages of words, separated by blank lines."""
    rng = np.random.default_rng(seed)
    return ["\n".join(" ".join(rng.choice(WORDS, rng.integers(1, 9))) for _ in range(rng.integers(1, 4)))
            for _ in range(count)]


def read_shards(paths):
    return [np.load(p) for p in paths]


def split_docs(tokens):
    """The documents of a shard as token lists, each without its leading EOT."""
    assert tokens[0] == EOT  # a shard starts with a whole document
    cuts = list(np.flatnonzero(tokens == EOT)) + [len(tokens)]
    return [tokens[a + 1:b].tolist() for a, b in zip(cuts, cuts[1:])]


def test_prepare_shakespeare_writes_val_then_train(tmp_path, capsys):
    tok = tiny_tokenizer(tmp_path / "tok")
    texts = passages(60)
    source = tmp_path / "input.txt"
    source.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    paths = prepare.main(["shakespeare", "--input", str(source), "--out-dir", str(out),
                          "--tokenizer-dir", tok, "--workers", "1"])
    assert [Path(p).name for p in paths] == ["shakespeare_val_000000.npy", "shakespeare_train_000001.npy"]
    assert "wrote 2 shards" in capsys.readouterr().out
    shards = read_shards(paths)
    assert all(s.dtype == np.uint16 for s in shards)
    enc = tokenizer.gpt2_encoding(tok)
    docs = [enc.decode(d) for s in shards for d in split_docs(s)]
    assert docs == texts[:-1] + [texts[-1] + "\n"]  # the passages in order (the file's last newline kept)
    total = sum(len(s) for s in shards)
    assert 0.05 * total < len(shards[0]) <= 0.1 * total  # val: the first ~10% of tokens, whole documents
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(p).name for p in paths)  # no temporary files left


def test_fineweb_sharding_with_a_fake_stream_and_a_pool(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    texts = [t.replace("\n", " ") for t in passages(40, seed=1)] + ["the " * 80]  # the last: longer than a shard
    one = prepare.prepare_fineweb(str(tmp_path / "a"), shard_tokens=60, workers=1, tokenizer_dir=tok,
                                  texts=iter(texts), total=None)
    two = prepare.prepare_fineweb(str(tmp_path / "b"), shard_tokens=60, workers=2, tokenizer_dir=tok,
                                  texts=iter(texts), total=None)
    assert [Path(p).name for p in one] == [Path(p).name for p in two]
    assert Path(one[0]).name == "fineweb-edu_val_000000.npy"
    assert [Path(p).name for p in one[1:3]] == ["fineweb-edu_train_000001.npy", "fineweb-edu_train_000002.npy"]
    a, b = read_shards(one), read_shards(two)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # the pool keeps the documents' order
    # a shard never passes 60 tokens unless it is one document longer than that (the last here)
    assert all(len(s) <= 60 or len(split_docs(s)) == 1 for s in a)
    assert len(a[-1]) == 82  # EOT, "the", 79 x " the", " "
    assert len(a) > 4 and sum(len(s) > 60 for s in a) >= 1
    enc = tokenizer.gpt2_encoding(tok)
    assert [enc.decode(d) for s in a for d in split_docs(s)] == texts
    # rerun with bigger shards: the old shards of this name disappear
    again = prepare.prepare_fineweb(str(tmp_path / "a"), shard_tokens=800, workers=1, tokenizer_dir=tok,
                                    texts=iter(texts), total=None)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(Path(p).name for p in again)
    assert len(again) == 2 and np.array_equal(np.concatenate(read_shards(again)), np.concatenate(a))


def test_fineweb_without_datasets_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SystemExit, match="pip install datasets"):
        prepare.main(["fineweb-edu", "--out-dir", str(tmp_path / "out"), "--workers", "1",
                      "--tokenizer-dir", tiny_tokenizer(tmp_path / "tok")])


def test_missing_tokenizer_fails_before_the_pool_starts(tmp_path):
    # a pool whose initializer raises would restart its workers forever: the error must come first
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        prepare.prepare_fineweb(str(tmp_path), workers=2, tokenizer_dir=str(tmp_path), texts=iter(["a"]))


def test_prepare_real_shakespeare_then_load(gpt2_dir, tmp_path):
    source = SHARED / "tinyshakespeare.txt"
    if not source.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt not found")
    text = source.read_text(encoding="utf-8")
    paths = prepare.prepare_shakespeare(str(tmp_path), str(source), workers=1, tokenizer_dir=gpt2_dir)
    shards = read_shards(paths)
    enc = tokenizer.gpt2_encoding(gpt2_dir)
    docs = [enc.decode(d) for s in shards for d in split_docs(s)]
    assert docs[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    assert docs == prepare.shakespeare_documents(text) and len(docs) > 7000  # every passage, in order
    val, total = len(shards[0]), sum(len(s) for s in shards)
    assert 0.09 * total < val <= 0.1 * total and 300_000 < total < 400_000
    loader = TokenLoader.from_dir(tmp_path, "train", batch_size=4, seq_len=64, seed=0)
    x, _ = loader.next_batch()
    pieces = enc.decode(x.reshape(-1).tolist()).split("<|endoftext|>")
    assert len(pieces) > 1 and all(piece in text for piece in pieces)  # whole passages of the play


# ----------------------------------------------------------------------------------------------
# HellaSwag


class ByteEncoding:
    """A stand-in tokenizer: one token per UTF-8 byte."""

    def encode(self, text):
        return list(text.encode("utf-8"))


class BigramModel(torch.nn.Module):
    """logits[b, t] = table[idx[b, t]]: each next-token distribution depends on one token only,
    so the loss of a sequence can be worked out by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx):
        return self.table[idx], None


def write_hellaswag(path, examples):
    """A .jsonl file in the real format (the fields of hellaswag_val.jsonl)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (ctx, endings, label) in enumerate(examples):
            f.write(json.dumps({"ind": i, "activity_label": "Test", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                                "split": "val", "split_type": "indomain", "label": label,
                                "endings": endings, "source_id": f"test~{i}"}) + "\n")
    return str(path)


def hellaswag_examples(count, seed=0):
    rng = np.random.default_rng(seed)
    def words(n):
        return " ".join(rng.choice(WORDS, n))
    return [(words(rng.integers(2, 6)), [words(rng.integers(1, 5)) for _ in range(4)], int(rng.integers(4)))
            for _ in range(count)]


def hand_losses(table, ctx, ending):
    """Mean over the ending's bytes of -log p(byte | previous byte), with plain floats."""
    row = list(ctx.encode()) + list((" " + ending).encode())
    losses = []
    for t in range(len(ctx.encode()), len(row)):
        scores = table[row[t - 1]].tolist()
        top = max(scores)
        log_z = top + math.log(sum(math.exp(s - top) for s in scores))
        losses.append(log_z - scores[row[t]])
    return sum(losses) / len(losses)


def test_render_example_pads_and_masks_the_endings():
    ctx, endings = "a cat", ["sat", "ran off", "", "is"]
    tokens, mask, label = hellaswag.render_example({"ctx": ctx, "endings": endings, "label": "2"}, ByteEncoding())
    assert tokens.shape == mask.shape == (4, 5 + 8) and tokens.dtype == mask.dtype == torch.long and label == 2
    for i, ending in enumerate(endings):
        row = list((ctx + " " + ending).encode())
        assert tokens[i, :len(row)].tolist() == row and not tokens[i, len(row):].any()
        assert mask[i].tolist() == [0] * 5 + [1] * (len(row) - 5) + [0] * (13 - len(row))


def test_scoring_matches_a_hand_computation(tmp_path):
    table = 3 * torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    model = BigramModel(table)
    examples = []
    for i, (ctx, endings, _) in enumerate(hellaswag_examples(11)):
        pick = int(np.argmin([hand_losses(table, ctx, e) for e in endings]))
        examples.append((ctx, endings, pick if i % 2 == 0 else (pick + 1) % 4))  # even ones right
    expected = 6
    path = write_hellaswag(tmp_path / "val.jsonl", examples)
    # the per-row losses themselves, on a padded batch of one example
    tokens, mask, _ = hellaswag.render_example(next(hellaswag.iterate_examples(path)), ByteEncoding())
    ctx, endings, _ = examples[0]
    got = hellaswag.ending_losses(model(tokens)[0], tokens, mask)
    want = torch.tensor([hand_losses(table, ctx, e) for e in endings], dtype=torch.float32)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got, want)
    for batch_size in (1, 4, 64):  # padding depends on the batch; the counts must not
        assert hellaswag.evaluate(model, path, "cpu", ByteEncoding(), batch_size=batch_size) == (expected, 11)
    # ranks take disjoint shares whose counts add up to the whole
    shares = [hellaswag.evaluate(model, path, "cpu", ByteEncoding(), rank=r, world_size=3, batch_size=2)
              for r in range(3)]
    assert shares == [(2, 4), (2, 4), (2, 3)]  # rank r: examples r, r + 3, ...; the even ones are right


def test_known_ending_wins(tmp_path):
    # a model sure that byte b is followed by byte b + 1: the ending "!\"#$" continues " " (32)
    # with 33, 34, 35, 36 and is picked whatever its position among the endings
    table = torch.zeros(256, 256)
    table[torch.arange(255), torch.arange(1, 256)] = 20.0
    winner = "!\"#$"
    examples = [("abc", [winner, "zq", "xyz", "qqq"], 0), ("abc", ["zq", "xx", "qqq", winner], 3),
                ("de", ["zq", winner, "x", "qqq"], 0)]
    path = write_hellaswag(tmp_path / "val.jsonl", examples)
    assert hellaswag.evaluate(BigramModel(table), path, "cpu", ByteEncoding(), batch_size=2) == (2, 3)


def test_tiny_gpt_batched_equals_one_row_at_a_time(tmp_path):
    from tritongpt.model.gpt import GPT, GPTConfig
    model = GPT(GPTConfig.from_name("tiny", vocab_size=256, kernels="none")).eval()
    examples = hellaswag_examples(6, seed=2)
    path = write_hellaswag(tmp_path / "val.jsonl", examples)
    correct = 0
    with torch.no_grad():
        for ctx, endings, label in examples:  # unpadded rows, one at a time
            losses = []
            for ending in endings:
                row = torch.tensor([list((ctx + " " + ending).encode())])
                logits, _ = model(row)
                n = len(ctx.encode())
                losses.append(F.cross_entropy(logits[0, n - 1:-1], row[0, n:]).item())
            correct += int(np.argmin(losses)) == label
    assert hellaswag.evaluate(model, path, "cpu", ByteEncoding(), batch_size=4) == (correct, 6)


def test_download_caches_once_and_explains_offline(tmp_path):
    source = write_hellaswag(tmp_path / "source.jsonl", hellaswag_examples(2))
    path = hellaswag.download(tmp_path / "cache", url=Path(source).as_uri())
    assert Path(path).read_text() == Path(source).read_text()
    assert hellaswag.download(tmp_path / "cache", url="file:///nowhere/at/all.jsonl") == path  # cached
    assert len(list(hellaswag.iterate_examples(path))) == 2
    with pytest.raises(RuntimeError, match="copy it to"):
        hellaswag.download(tmp_path / "empty", url=(tmp_path / "missing.jsonl").as_uri())
    assert not (tmp_path / "empty" / "hellaswag_val.jsonl").exists()


def test_prepare_names_a_file_that_is_not_utf8(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    source = tmp_path / "latin1.txt"
    source.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(SystemExit) as info:
        prepare.main(["shakespeare", "--input", str(source), "--out-dir", str(tmp_path / "out"),
                      "--workers", "1", "--tokenizer-dir", str(tok)])
    assert str(source) in str(info.value.code) and "not UTF-8" in str(info.value.code)


@pytest.mark.parametrize("shuffle", [True, False])
def test_ids_outside_the_vocabulary_name_the_shard(tmp_path, shuffle):
    good, bad = tmp_path / "a_train_000000.npy", tmp_path / "a_train_000001.npy"
    np.save(good, np.arange(100, dtype=np.uint16))
    np.save(bad, np.array([EOT, 5, 60000, 7] * 10, dtype=np.uint16))
    loader = TokenLoader([good, bad], batch_size=2, seq_len=8, shuffle=shuffle, vocab_size=50304)
    with pytest.raises(ValueError, match=r"a_train_000001\.npy: token id 60000 is outside"):
        for _ in range(20):
            loader.next_batch()
    fine = TokenLoader([good], batch_size=2, seq_len=8, shuffle=shuffle, vocab_size=100)
    assert fine.next_batch()[0].max() < 100
