"""Token batches from memory-mapped shards: shuffled per epoch, split across ranks, resumable.

The stream. Epoch e is one pass over every token of every shard: the shards in an order shuffled
from (seed, e), and inside each shard its documents in an order shuffled from (seed, e, shard).
A document starts at an EOT token and runs to the next one (tokens before a shard's first EOT form
one more document), so a document is never cut by the shuffle. Epochs follow each other without a
gap, which makes one endless token stream; rows of seq_len + 1 tokens are read from it at steps
of seq_len (x = row[:-1], y = row[1:]), so row j starts at token j * seq_len of the stream. A
batch may straddle documents, shards and epochs: shards shorter than a batch are fine.

Ranks. At step s the shared stream gives world_size * batch_size consecutive rows, and rank r takes
rows [(s * world_size + r) * batch_size, (s * world_size + r + 1) * batch_size). The rows of
ranks 0..world_size-1 at a step, concatenated in rank order, are therefore exactly the rows one
process with batch_size * world_size gets at that step: `torchrun --nproc_per_node=2` with batch
size B sees the same data as one process with batch size 2B.

Resuming. `state_dict()` holds the shared stream's position at the next step (epoch and token
offset in it). It is the same on every rank, so rank 0's copy restores them all, and the batches
after `load_state_dict` are exactly the ones the original loader would have produced next. It
can also restart with another world_size or batch_size: the stream then continues from the same
token.

Memory. Shards are memory-mapped (np.load(mmap_mode="r")) and never copied whole; a batch gathers
its B * T + 1 tokens from them. For the two shards read most recently the loader keeps their
document layout in memory: 16 bytes per document (source start and running offset, int64; about
40 bytes while it is built), e.g. about 16 MB for a 100M-token FineWeb-Edu shard of ~1M documents.
Finding the documents reads the shard once per epoch, in 16M-token pieces.
"""
import glob
import os
from collections import OrderedDict

import numpy as np
import torch

EOT = 50256  # GPT-2's <|endoftext|>
_SCAN_CHUNK = 1 << 24  # tokens per piece when looking for EOT tokens
_LAYOUT_CACHE = 2  # shard document layouts kept in memory


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _open_shard(index, shard):
    """A 1-D integer array: a path is memory-mapped, an array is used as it is (not copied)."""
    if isinstance(shard, (str, os.PathLike)):
        shard = np.load(shard, mmap_mode="r", allow_pickle=False)
    elif isinstance(shard, torch.Tensor):
        shard = shard.numpy()
    elif not isinstance(shard, np.ndarray):
        raise TypeError(f"shards[{index}] must be a path to a .npy file or a numpy array, "
                        f"got {type(shard).__name__}")
    if not np.issubdtype(shard.dtype, np.integer):
        raise TypeError(f"shards[{index}] must hold integer tokens, got dtype {shard.dtype}")
    if shard.ndim != 1:
        raise ValueError(f"shards[{index}] must be 1-D, got shape {shard.shape}")
    return shard


def _shard_name(index, shard):
    """How messages name a shard: its path, or its place in the list for an in-memory array."""
    return os.fspath(shard) if isinstance(shard, (str, os.PathLike)) else f"shards[{index}]"


def _document_starts(tokens, eot):
    """Offsets where documents start: 0 and every EOT token (scanned in pieces: no full-size temp)."""
    found = [np.zeros(1, dtype=np.int64)]
    for lo in range(0, len(tokens), _SCAN_CHUNK):
        found.append(np.flatnonzero(tokens[lo:lo + _SCAN_CHUNK] == eot) + lo)
    return np.unique(np.concatenate(found))


class _ShardLayout:
    """One shard's documents in one epoch's order: sources and running offsets in that order."""

    def __init__(self, tokens, eot, rng):
        starts = _document_starts(tokens, eot)
        lengths = np.diff(np.append(starts, len(tokens)))
        order = rng.permutation(len(starts))
        self.src = starts[order]
        self.offsets = np.concatenate([[0], np.cumsum(lengths[order])])

    def gather(self, tokens, lo, n):
        """Tokens [lo, lo + n) of the shuffled shard, gathered with one fancy index."""
        first = np.searchsorted(self.offsets, lo, side="right") - 1
        last = np.searchsorted(self.offsets, lo + n, side="left")
        seg_lo = np.maximum(self.offsets[first:last], lo)
        seg_len = np.minimum(self.offsets[first + 1:last + 1], lo + n) - seg_lo
        # output k (stream position lo + k) of segment j reads src[j] + (lo + k - offsets[j])
        base = self.src[first:last] - self.offsets[first:last] + lo
        return tokens[np.repeat(base, seg_len) + np.arange(n)]


class TokenLoader:
    """Endless (x, y) batches of shape (batch_size, seq_len) from token shards; see the module doc.

    shards: paths to .npy files of tokens (memory-mapped) or 1-D integer arrays, in a fixed order
    (the shuffle is seeded, so the order given matters for reproducibility). eot: the token that
    starts a document. shuffle=False reads the shards and documents in the order given (for
    validation). vocab_size: when given, each shard is checked once, when first read, to hold
    only ids below it (ValueError naming the shard otherwise: an embedding would fail on them).
    """

    def __init__(self, shards, batch_size, seq_len, rank=0, world_size=1, seed=0, eot=EOT, shuffle=True,
                 vocab_size=None):
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be below world_size={self.world_size}, got {self.rank}")
        self.seed = _check_int("seed", seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"seed must be below 2**32, got {self.seed}")
        self.eot = _check_int("eot", eot, 0)
        self.shuffle = bool(shuffle)
        if isinstance(shards, (str, os.PathLike, np.ndarray, torch.Tensor)) or len(shards) == 0:
            raise ValueError("shards must be a non-empty list of .npy paths or arrays")
        self.vocab_size = None if vocab_size is None else _check_int("vocab_size", vocab_size, 1)
        opened = [(_shard_name(i, s), _open_shard(i, s)) for i, s in enumerate(shards)]
        self.names = [name for name, s in opened if len(s) > 0]
        self.shards = [s for _, s in opened if len(s) > 0]
        self._checked = set()  # shards whose ids were checked against vocab_size
        if not self.shards:
            raise ValueError("shards hold no tokens")
        self.num_tokens = sum(len(s) for s in self.shards)  # tokens per epoch
        self._position = 0  # the shared stream's token index at the start of the next step
        self._epoch_cache = (None, None, None)
        self._layouts = OrderedDict()

    @classmethod
    def from_dir(cls, data_dir, split, batch_size, seq_len, rank=0, world_size=1, seed=0, **kwargs):
        """A loader over data_dir's `*_<split>_*.npy` shards (what `python -m tritongpt.data.prepare` writes)."""
        shards = sorted(glob.glob(os.path.join(glob.escape(str(data_dir)), f"*_{split}_*.npy")))
        if not shards:
            raise FileNotFoundError(
                f"no {split} shards (*_{split}_*.npy) in {data_dir}; prepare them first, e.g. "
                f"`python -m tritongpt.data.prepare fineweb-edu --out-dir {data_dir}` or "
                f"`python -m tritongpt.data.prepare shakespeare --out-dir {data_dir}`")
        return cls(shards, batch_size, seq_len, rank=rank, world_size=world_size, seed=seed, **kwargs)

    @property
    def epoch(self):
        """The epoch the next step starts in."""
        return self._position // self.num_tokens

    def next_batch(self):
        """(x, y): int64 CPU tensors of shape (batch_size, seq_len), y the next token of each x."""
        rows = self.batch_size * self.seq_len
        start = self._position + self.rank * rows
        tokens = torch.from_numpy(self._read(start, rows + 1).astype(np.int64))
        self._position += self.world_size * rows
        x = tokens[:-1].view(self.batch_size, self.seq_len)
        y = tokens[1:].view(self.batch_size, self.seq_len)
        return x, y

    def reset(self):
        """Back to the first token of epoch 0."""
        self._position = 0

    def state_dict(self):
        """The shared stream's position (identical on every rank) plus what checks a restore."""
        epoch, offset = divmod(self._position, self.num_tokens)
        return {"epoch": int(epoch), "position": int(offset), "seed": self.seed,
                "shuffle": self.shuffle, "num_tokens": int(self.num_tokens)}

    def load_state_dict(self, state):
        """Continue exactly where the loader that wrote `state` left off."""
        for key in ("seed", "shuffle", "num_tokens"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}: it was saved for other data")
        epoch, offset = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= offset < self.num_tokens:
            raise ValueError(f"loader state has epoch={epoch}, position={offset}: out of range")
        self._position = epoch * self.num_tokens + offset

    def _read(self, start, n):
        """Tokens [start, start + n) of the endless stream, crossing epochs where needed."""
        pieces = []
        while n > 0:
            epoch, offset = divmod(start, self.num_tokens)
            take = min(n, self.num_tokens - offset)
            pieces.append(self._read_epoch(epoch, offset, take))
            start, n = start + take, n - take
        return np.concatenate(pieces)

    def _read_epoch(self, epoch, offset, n):
        order, starts = self._shard_order(epoch)
        i = np.searchsorted(starts, offset, side="right") - 1
        pieces = []
        while n > 0:
            shard = order[i]
            lo = offset - starts[i]
            take = min(n, int(starts[i + 1]) - offset)
            pieces.append(self._read_shard(epoch, shard, lo, take))
            offset, n, i = offset + take, n - take, i + 1
        return np.concatenate(pieces)

    def _shard_order(self, epoch):
        """The epoch's shard order and each shard's first token in that epoch's stream."""
        if self._epoch_cache[0] != epoch:
            if self.shuffle:
                order = self._rng(epoch).permutation(len(self.shards))
            else:
                order = np.arange(len(self.shards))
            lengths = [len(self.shards[k]) for k in order]
            self._epoch_cache = (epoch, order, np.concatenate([[0], np.cumsum(lengths)]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _read_shard(self, epoch, shard, lo, n):
        tokens = self.shards[shard]
        self._check_ids(shard)
        if not self.shuffle:
            return np.asarray(tokens[lo:lo + n])
        key = (epoch, int(shard))
        if key not in self._layouts:
            self._layouts[key] = _ShardLayout(tokens, self.eot, self._rng(epoch, shard))
            while len(self._layouts) > _LAYOUT_CACHE:
                self._layouts.popitem(last=False)
        return self._layouts[key].gather(tokens, lo, n)

    def _check_ids(self, shard):
        """Once per shard: every id below vocab_size (scanned in pieces: no full-size temp)."""
        if self.vocab_size is None or shard in self._checked:
            return
        tokens = self.shards[shard]
        for lo in range(0, len(tokens), _SCAN_CHUNK):
            piece = tokens[lo:lo + _SCAN_CHUNK]
            top, bottom = int(piece.max()), int(piece.min())
            if top >= self.vocab_size or bottom < 0:
                bad = top if top >= self.vocab_size else bottom
                raise ValueError(f"{self.names[shard]}: token id {bad} is outside the model's vocabulary "
                                 f"(0..{self.vocab_size - 1}); was it made with another tokenizer?")
        self._checked.add(shard)

    def _rng(self, *keys):
        # numpy's legacy RandomState: its streams are frozen across numpy versions, so a saved
        # run resumes into the same order after an upgrade (Generator streams may change).
        return np.random.RandomState([self.seed, *(int(k) for k in keys)])
