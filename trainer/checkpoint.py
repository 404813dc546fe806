"""Checkpoints that survive a crash mid-write and let a run continue bit for bit.

A checkpoint holds the model, the optimizer, the number of steps done, the options it was made
with, and per process the RNG states (torch, CUDA, numpy, python) and the data loader's position.
It is written to a temporary file in the same directory, flushed to disk, then renamed over the
old one: a rename within one file system is atomic, so a reader sees the old file or the new one,
never half of one.
"""
import os
import random

import numpy as np
import torch

from tritongpt.data._files import atomic_write


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


def save(path, checkpoint):
    """torch.save(checkpoint) to path atomically: a temporary file, flushed to disk, renamed."""
    def write(f):
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file

    atomic_write(path, write)


def load(path):
    """A checkpoint written by save(); plain tensors and Python values only (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def describe(path):
    """What a message should say about the checkpoint at path."""
    return path if os.path.isfile(path) else "none (no checkpoint was written yet)"
