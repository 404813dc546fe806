"""Tokenize a dataset with GPT-2's BPE into uint16 .npy shards for data.loader.TokenLoader.

    python -m tritongpt.data.prepare shakespeare [--input FILE]       # tiny Shakespeare, ~331K tokens, seconds
    python -m tritongpt.data.prepare fineweb-edu                       # FineWeb-Edu sample-10BT, ~10B tokens, hours

Options: --out-dir DIR (default data/<name>/ in the repository), --shard-tokens N (default 1e8),
--workers N (processes tokenizing in parallel), --tokenizer-dir DIR (a folder with GPT-2's
encoder.json and vocab.bpe, for machines without internet; see data/tokenizer.py).

Each document becomes EOT (50256) followed by its tokens, so a document starts at an EOT token.
Documents are written whole, in order, into shards `<name>_val_000000.npy`,
`<name>_train_000001.npy`, ...: the first shard is the validation split. A shard is closed before
a document that would take it past its size (a document longer than a shard gets one of its
own). Sizes: FineWeb-Edu's val shard is one shard (--shard-tokens); Shakespeare's holds its first
10% of tokens. Every file is written under a temporary name and renamed, and shards of the same
name left over from an earlier run are removed at the end.

Shakespeare's documents are its passages separated by blank lines (mostly one speech each); the
text comes from --input, else it is downloaded once into the output folder. FineWeb-Edu is
streamed from the Hugging Face hub (HuggingFaceFW/fineweb-edu, sample-10BT) with the `datasets`
package, which this script alone needs (`pip install datasets`).
"""
import argparse
import glob
import itertools
import multiprocessing
import os
import sys
import time

import numpy as np

from tritongpt.data._files import fetch, save_tokens
from tritongpt.data.tokenizer import EOT, gpt2_encoding

DEFAULT_SHARD_TOKENS = 100_000_000
HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = ("shakespeare", "fineweb-edu")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB = ("HuggingFaceFW/fineweb-edu", "sample-10BT")
FINEWEB_DOCS = 9_672_101  # rows of sample-10BT, for the progress bar's total
BLOCK_DOCS = 4096  # documents handed to the pool at a time (two blocks in flight bound memory)

_encoding = None  # each worker process's tokenizer


def _init_worker(tokenizer_dir):
    global _encoding
    _encoding = gpt2_encoding(tokenizer_dir)
    if _encoding.n_vocab > 2**16:
        raise ValueError(f"a vocabulary of {_encoding.n_vocab} tokens does not fit in uint16")


def _tokenize(text):
    return np.array([EOT] + _encoding.encode_ordinary(text), dtype=np.uint16)


def tokenize_documents(texts, workers=1, tokenizer_dir=None):
    """Yield each text as a uint16 array [EOT, tokens...], in the input's order; with workers > 1
    a process pool tokenizes blocks of documents while the previous block is consumed."""
    # load (and check) the tokenizer here first: a failing pool initializer would make the pool
    # restart workers forever; forked workers also inherit the loaded encoding
    _init_worker(tokenizer_dir)
    if workers <= 1:
        yield from map(_tokenize, texts)
        return
    texts = iter(texts)
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
        pending = None
        while block := list(itertools.islice(texts, BLOCK_DOCS)):
            submitted = pool.imap(_tokenize, block, chunksize=16)
            if pending is not None:
                yield from pending
            pending = submitted
        if pending is not None:
            yield from pending


def progress(docs, total=None, desc="tokenizing"):
    """Pass the token arrays through, showing documents and tokens done: tqdm when installed,
    else a line on stderr every 10 seconds and at the end."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=total, unit="docs", desc=desc, mininterval=1.0) if tqdm else None
    count = tokens = 0
    last = time.time()
    for doc in docs:
        count, tokens = count + 1, tokens + len(doc)
        if bar is not None:
            bar.update(1)
            if count % 1000 == 0:
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
        elif time.time() - last > 10:
            last = time.time()
            print(f"{desc}: {count:,} docs, {tokens:,} tokens", file=sys.stderr, flush=True)
        yield doc
    if bar is not None:
        bar.set_postfix(tokens=f"{tokens:,}")
        bar.close()
    else:
        print(f"{desc}: {count:,} docs, {tokens:,} tokens, done", file=sys.stderr, flush=True)


def write_shards(docs, out_dir, name, shard_tokens, val_tokens):
    """Write token arrays into shards (see the module docstring); returns the paths written."""
    written, buffer, size = [], [], 0

    def flush():
        split = "train" if written else "val"
        path = os.path.join(out_dir, f"{name}_{split}_{len(written):06d}.npy")
        save_tokens(path, np.concatenate(buffer))
        written.append(path)
        buffer.clear()

    for doc in docs:
        capacity = shard_tokens if written else val_tokens
        if buffer and size + len(doc) > capacity:
            flush()
            size = 0
        buffer.append(doc)
        size += len(doc)
    if buffer:
        flush()
    if len(written) < 2:
        raise ValueError(f"{name}: too little text: it filled {len(written)} shard, and a val and a "
                         "train shard are needed")
    keep = {os.path.basename(p) for p in written}
    for old in glob.glob(os.path.join(glob.escape(out_dir), f"{name}_*_*.npy")):
        if os.path.basename(old) not in keep:  # a shard of an earlier run with other settings
            os.remove(old)
    return written


def shakespeare_documents(text):
    """The passages between blank lines (empty ones dropped)."""
    return [doc for doc in text.split("\n\n") if doc.strip()]


def prepare_shakespeare(out_dir, input_path=None, shard_tokens=DEFAULT_SHARD_TOKENS, workers=1,
                        tokenizer_dir=None):
    gpt2_encoding(tokenizer_dir)  # fail early, before any download, when the tokenizer is missing
    if input_path is None:
        input_path = fetch(SHAKESPEARE_URL, os.path.join(out_dir, "input.txt"), "tiny Shakespeare")
    try:
        with open(input_path, encoding="utf-8") as f:
            texts = shakespeare_documents(f.read())
    except UnicodeDecodeError as err:  # its message names the byte, not the file
        raise ValueError(f"{input_path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    docs = list(progress(tokenize_documents(texts, workers, tokenizer_dir), total=len(texts)))
    val_tokens = sum(len(d) for d in docs) // 10
    return write_shards(docs, out_dir, "shakespeare", shard_tokens, val_tokens)


def fineweb_texts():
    """FineWeb-Edu sample-10BT's texts, streamed from the hub (nothing stored on disk but caches)."""
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError("fineweb-edu needs the `datasets` package: pip install datasets") from err
    rows = datasets.load_dataset(FINEWEB[0], name=FINEWEB[1], split="train", streaming=True)
    return (row["text"] for row in rows)


def prepare_fineweb(out_dir, shard_tokens=DEFAULT_SHARD_TOKENS, workers=1, tokenizer_dir=None, texts=None,
                    total=FINEWEB_DOCS):
    """Shard FineWeb-Edu (or any iterable of texts passed as `texts`): the first shard is val."""
    gpt2_encoding(tokenizer_dir)  # fail early, before streaming starts, when the tokenizer is missing
    texts = fineweb_texts() if texts is None else texts
    docs = progress(tokenize_documents(texts, workers, tokenizer_dir), total=total)
    return write_shards(docs, out_dir, "fineweb-edu", shard_tokens, shard_tokens)


def default_out_dir(dataset):
    """Where the shards of `dataset` go by default (and where train.py --data <dataset> reads them)."""
    return os.path.join(HERE, dataset)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tritongpt.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--out-dir", help="where the shards go (default: data/<dataset>/ in the repository)")
    p.add_argument("--input", help="shakespeare only: the text file (default: download it)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizing processes (default: half the CPU cores)")
    p.add_argument("--tokenizer-dir", help="a folder with GPT-2's encoder.json and vocab.bpe (offline)")
    args = p.parse_args(argv)
    if args.shard_tokens < 1 or args.workers < 1:
        p.error("--shard-tokens and --workers must be at least 1")
    if args.input and args.dataset != "shakespeare":
        p.error("--input is for shakespeare only")
    return args


def main(argv=None):
    args = parse_args(argv)
    out_dir = args.out_dir or default_out_dir(args.dataset)
    try:
        if args.dataset == "shakespeare":
            paths = prepare_shakespeare(out_dir, args.input, args.shard_tokens, args.workers, args.tokenizer_dir)
        else:
            paths = prepare_fineweb(out_dir, args.shard_tokens, args.workers, args.tokenizer_dir)
    except (RuntimeError, OSError, ValueError) as err:
        sys.exit(f"tritongpt.data.prepare: {err}")
    sizes = [len(np.load(p, mmap_mode="r")) for p in paths]
    print(f"wrote {len(paths)} shards to {out_dir}: val {sizes[0]:,} tokens, train {sum(sizes[1:]):,} tokens")
    return paths


if __name__ == "__main__":
    main()
