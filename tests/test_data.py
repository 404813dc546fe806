"""The data package: tokenizer loading, shard preparation, the token loader, HellaSwag scoring.

Everything runs offline on CPU. Tests that need the real GPT-2 tokenizer or tiny Shakespeare take
them from ../shared/data beside the repository and skip cleanly when it is absent.
"""
import json

import numpy as np
import pytest
import torch

from data.loader import EOT, TokenLoader


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


def test_from_dir_memory_maps_the_split(tmp_path):
    shards = make_shards([3, 4, 5])
    np.save(tmp_path / "toy_val_000000.npy", shards[0])
    np.save(tmp_path / "toy_train_000001.npy", shards[1])
    np.save(tmp_path / "toy_train_000002.npy", shards[2])
    loader = TokenLoader.from_dir(tmp_path, "train", 2, 3, shuffle=False)
    assert all(isinstance(s, np.memmap) for s in loader.shards)
    assert loader.num_tokens == len(shards[1]) + len(shards[2])
    assert np.array_equal(stream_of(loader, 1), np.concatenate(shards[1:])[:6])
    with pytest.raises(FileNotFoundError, match="python -m data.prepare"):
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
