"""Checkpoints that survive a crash mid-write, prove their integrity, and let a run continue bit
for bit.

A checkpoint holds the model, the optimizer, the number of steps done, the options it was made
with, and per process the RNG states (torch, CUDA, numpy, python) and the data loader's position,
plus a format tag and a SHA-256 digest of all of that. It is written to a temporary file in the
same directory, flushed to disk, then renamed over the old one: a rename within one file system
is atomic, so a reader sees the old file or the new one, never half of one. load() recomputes the
digest, so a file damaged on disk (flipped bits, truncation) is refused instead of resumed.
The file stays a plain torch.save file (torch.load reads it).
"""
import glob
import hashlib
import os
import random

import numpy as np
import torch

from tritongpt.data._files import atomic_write

FORMAT = "tritongpt-checkpoint-1"


class CheckpointError(Exception):
    """A checkpoint cannot be read or written; the message names the file and what is wrong."""


def rng_state():
    """This process's random number generator states, as plain tensors and Python objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def digest(obj):
    """SHA-256 of a checkpoint's contents: tensors by dtype, shape and bytes, everything else by
    repr, dict keys in sorted order. Independent of how torch.save lays the file out."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for key in sorted(x, key=repr):
                h.update(repr(key).encode())
                feed(x[key])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for item in x:
                feed(item)
            h.update(b"]")
        else:
            h.update(repr(x).encode())
    feed(obj)
    return h.hexdigest()


def clean_temporaries(path):
    """Remove the temporary files of writes to `path` whose process is gone (killed mid-write)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp*"):
        suffix = tmp[len(path) + 4:]
        if suffix.isdigit() and int(suffix) != os.getpid() and _alive(int(suffix)):
            continue  # another live process is writing it right now
        try:
            os.remove(tmp)
        except OSError:
            pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save(path, checkpoint):
    """Write checkpoint (a dict) with its format tag and digest to path atomically. On a write
    failure (disk full, ...) CheckpointError says so; the previous file at path is untouched."""
    content = {**checkpoint, "format": FORMAT}
    content["sha256"] = digest(content)

    def write(f):
        torch.save(content, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file

    clean_temporaries(path)
    try:
        atomic_write(path, write)
    except OSError as err:
        kept = f"the previous checkpoint {path} is kept" if os.path.isfile(path) else "no checkpoint was kept"
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}; {kept}") from err


def load(path):
    """A checkpoint written by save(), verified against its digest; CheckpointError (one line
    naming the file) for a missing, unreadable, truncated, foreign or damaged file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here: RuntimeError, EOFError, UnpicklingError...
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: unreadable (truncated, damaged or not a torch file: {reason})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tritongpt checkpoint (no {FORMAT!r} tag)")
    stored = content.pop("sha256", None)
    if stored != digest(content):
        raise CheckpointError(f"{path}: checksum mismatch, the file is damaged; resume from an older copy")
    return content


def describe(path):
    """What a message should say about the checkpoint at path."""
    return path if os.path.isfile(path) else "none (no checkpoint was written yet)"
