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
DEMO_EOT = 0  # the NUL byte, in no docstring, starts each demo document (GPT-2's <|endoftext|> role)
GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 128 for faster matmuls
DEMO_VAL_EVERY = 10  # every tenth docstring is held out for validation


def demo_documents():
    """Every docstring of the modules above and of their public members: about 310 KB of English."""
    docs = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                doc = inspect.getdoc(getattr(module, attr, None))
                if doc and doc not in docs:
                    docs.append(doc)
    return [doc for doc in docs if doc]


def _as_bytes(docs):
    text = "".join(f"{chr(DEMO_EOT)}{doc}\n\n" for doc in docs)
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    tokens.setflags(write=False)  # shared by every caller of the cache
    return tokens


@functools.lru_cache(maxsize=1)
def demo_splits():
    """The demo corpus as byte tokens: (train, val), every DEMO_VAL_EVERY-th docstring held out.
    Each docstring starts with DEMO_EOT, so the training loader shuffles whole docstrings: read in
    order, consecutive batches would all come from one module's documentation, and the model
    would chase that module instead of learning English. Cached: building the corpus imports and
    reads dozens of modules."""
    docs = demo_documents()
    return (_as_bytes(d for i, d in enumerate(docs) if i % DEMO_VAL_EVERY != DEMO_VAL_EVERY - 1),
            _as_bytes(docs[DEMO_VAL_EVERY - 1::DEMO_VAL_EVERY]))


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
        return TokenLoader([train if split == "train" else val], eot=DEMO_EOT, **common)
    return TokenLoader.from_dir(shard_dir(args.data), split, **common)


class ByteCodec:
    """The demo's tokenizer: UTF-8 bytes."""

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        """Text of the ids; the document separator DEMO_EOT is dropped."""
        return bytes(i for i in ids if 0 <= i < 256 and i != DEMO_EOT).decode("utf-8", errors="replace")


def codec(args):
    """The tokenizer of the run's tokens (demo: bytes; else GPT-2 BPE via data.tokenizer)."""
    if args.data == "demo":
        return ByteCodec()
    from tritongpt.data.tokenizer import gpt2_encoding
    return gpt2_encoding(getattr(args, "tokenizer_dir", None))
