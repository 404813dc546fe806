"""Where train.py's tokens come from: the offline demo corpus (bytes) or GPT-2 token shards.

The demo corpus is built from the docstrings of Python's standard library, which every machine
with Python has, tokenized as raw bytes (vocabulary 256): nothing is downloaded or stored. Every
other source is GPT-2 BPE tokens in .npy shards, read by data.loader.TokenLoader.
"""
import functools
import importlib
import inspect

import numpy as np

from tritongpt.data import prepare
from tritongpt.data.loader import TokenLoader

# Standard-library modules whose documentation makes the demo corpus.
CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io", "itertools",
    "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "statistics",
    "string", "subprocess", "tempfile", "textwrap", "threading", "unittest", "urllib.parse",
)
DEMO_VOCAB = 256
GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 128 for faster matmuls
DEMO_VAL_FRACTION = 0.1


def demo_corpus():
    """Every docstring of the modules above and of their public members, joined: about 340 KB of English."""
    docs = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                doc = inspect.getdoc(getattr(module, attr, None))
                if doc and doc not in docs:
                    docs.append(doc)
    return "\n\n".join(docs)


@functools.lru_cache(maxsize=1)
def demo_splits():
    """The demo corpus as byte tokens: (train, val), the last tenth held out for validation.
    Cached: building the corpus imports and reads dozens of modules."""
    tokens = np.frombuffer(demo_corpus().encode("utf-8"), dtype=np.uint8).astype(np.int64)
    tokens.setflags(write=False)  # shared by every caller of the cache
    cut = int(len(tokens) * (1 - DEMO_VAL_FRACTION))
    return tokens[:cut], tokens[cut:]


def shard_dir(data):
    """The shard directory for --data: a name prepared by data.prepare, or a directory."""
    return prepare.default_out_dir(data) if data in prepare.DATASETS else data


def vocab_size(args):
    """The model's vocabulary for --data: bytes for the demo, GPT-2's (padded) otherwise."""
    return DEMO_VOCAB if args.data == "demo" else GPT2_VOCAB


def loader(args, split, procs):
    """A TokenLoader over the split ("train": shuffled per epoch, or "val": in order) for this
    process's rank. FileNotFoundError (with a message) when the shards are missing; a shard
    holding ids outside the model's vocabulary is refused, by name, when first read."""
    common = dict(batch_size=args.batch_size, seq_len=args.seq_len, rank=procs.rank,
                  world_size=procs.world_size, seed=args.seed, shuffle=split == "train",
                  vocab_size=vocab_size(args))
    if args.data == "demo":
        train, val = demo_splits()
        return TokenLoader([train if split == "train" else val], **common)
    return TokenLoader.from_dir(shard_dir(args.data), split, **common)


class ByteCodec:
    """The demo's tokenizer: UTF-8 bytes."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def codec(args):
    """The tokenizer of the run's tokens (demo: bytes; else GPT-2 BPE via data.tokenizer)."""
    if args.data == "demo":
        return ByteCodec()
    from tritongpt.data.tokenizer import gpt2_encoding
    return gpt2_encoding(getattr(args, "tokenizer_dir", None))
