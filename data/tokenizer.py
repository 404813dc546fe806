"""GPT-2's BPE tokenizer as a tiktoken Encoding, also on machines without internet.

`gpt2_encoding()` looks, in order, in:
1. a local folder holding GPT-2's `encoder.json` and `vocab.bpe` (the argument, else the
   environment variable TRITONGPT_TOKENIZER_DIR); built from those two files, no network;
2. tiktoken's cache (TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache), used
   only when both cached files match GPT-2's published sha256;
3. tiktoken's own download (`tiktoken.get_encoding("gpt2")`), which fills that cache.
When all three fail the error says how to make one of them work.

The local loader parses the files itself and calls only tiktoken.Encoding's constructor, so it
works with every tiktoken release (older ones read local files through the optional blobfile
package).
"""
import functools
import hashlib
import json
import os
import tempfile

import tiktoken

EOT = 50256  # <|endoftext|>
FILES = ("encoder.json", "vocab.bpe")
# where tiktoken downloads the two files from, and their sha256 (tiktoken checks the same)
URLS = {
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, whitespace
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_symbols():
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, ...) map to chr(256), chr(257), ... in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def ranks_from_files(encoder_json, vocab_bpe):
    """tiktoken's mergeable ranks (token bytes -> id) from GPT-2's two files, checked against each
    other: merge i of vocab.bpe must make token 256 + i of encoder.json."""
    to_byte = {s: b for b, s in byte_symbols().items()}
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    ranks = {bytes(to_byte[c] for c in token): rank for token, rank in encoder.items()
             if token not in ("<|endoftext|>", "<|startoftext|>")}
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [line.split() for line in f.read().split("\n")[1:] if line]
    for i, (left, right) in enumerate(merges):
        merged = bytes(to_byte[c] for c in left + right)
        if ranks.get(merged) != 256 + i:
            raise ValueError(f"{vocab_bpe} and {encoder_json} disagree at merge {i} ({left!r} {right!r}): "
                             "they are not one GPT-2 tokenizer")
    if len(ranks) != 256 + len(merges):
        raise ValueError(f"{encoder_json} has {len(ranks)} tokens but {vocab_bpe} makes {256 + len(merges)}")
    return ranks


@functools.lru_cache(maxsize=4)
def _encoding_from_files(encoder_json, vocab_bpe):
    ranks = ranks_from_files(encoder_json, vocab_bpe)
    return tiktoken.Encoding(name="gpt2", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def from_folder(folder):
    """The encoding built from `folder`/encoder.json and `folder`/vocab.bpe, without network."""
    paths = [os.path.abspath(os.path.join(folder, name)) for name in FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"tokenizer folder {folder} lacks {', '.join(missing)}: it must hold "
                                "GPT-2's encoder.json and vocab.bpe")
    return _encoding_from_files(*paths)


def tiktoken_cache_dir():
    """The folder tiktoken caches downloads in, by tiktoken's own rules."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cached_files():
    """Paths of the two files in tiktoken's cache (named by the sha1 of their URL), or None when
    either is missing or is not the published file."""
    cache = tiktoken_cache_dir()
    if not cache:
        return None
    paths = []
    for name in FILES:
        path = os.path.join(cache, hashlib.sha1(URLS[name].encode()).hexdigest())
        try:
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != SHA256[name]:
                    return None
        except OSError:
            return None
        paths.append(os.path.abspath(path))
    return paths


def _download():
    return tiktoken.get_encoding("gpt2")


def gpt2_encoding(local_dir=None):
    """GPT-2's tokenizer (50257 tokens, <|endoftext|> = 50256): see the module docstring for where
    it is looked for. An explicit `local_dir` (or TRITONGPT_TOKENIZER_DIR) must hold the files."""
    local_dir = local_dir or os.environ.get("TRITONGPT_TOKENIZER_DIR")
    if local_dir:
        return from_folder(local_dir)
    cached = _cached_files()
    if cached:
        return _encoding_from_files(*cached)
    try:
        return _download()
    except Exception as err:  # network errors come as many types (requests, urllib3, OSError)
        raise RuntimeError(
            f"cannot load the GPT-2 tokenizer: no local folder given, tiktoken's cache "
            f"({tiktoken_cache_dir() or 'disabled'}) does not hold it, and downloading failed "
            f"({type(err).__name__}: {err}). On a machine without internet either set "
            "TIKTOKEN_CACHE_DIR to a tiktoken cache filled on a machine with internet (run "
            "`python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` there with the same "
            "variable set, then copy the folder), or pass a folder holding GPT-2's encoder.json and "
            "vocab.bpe (--tokenizer-dir DIR, gpt2_encoding(local_dir=DIR) or "
            f"TRITONGPT_TOKENIZER_DIR=DIR); they are at {URLS['encoder.json']} and {URLS['vocab.bpe']}."
        ) from err
