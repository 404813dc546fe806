"""HellaSwag (validation split, 10,042 examples) for a causal language model: acc_norm.

Each example is a context and four endings, one of them right. Every ending is scored by the mean
cross-entropy of its own tokens given the context and the ending's earlier tokens; the ending with
the lowest mean loss is the model's pick. Averaging over the ending's tokens, instead of summing,
keeps long endings from losing for their length: this is the "acc_norm" of the GPT-2 / GPT-3
reproductions (nanoGPT's HellaSwag script), which normalises by token count, not by the byte
count lm-evaluation-harness uses. Endings are tokenized with a leading space, as they follow the
context in running text.

    path = download()                          # once; ~/.cache/tritongpt/hellaswag_val.jsonl
    correct, total = evaluate(model, path, "cuda", enc, rank, world_size)   # all_reduce both on DDP
"""
import json
import os

import torch
import torch.nn.functional as F

from tritongpt.data._files import fetch

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tritongpt")
ENDINGS = 4


def cached_path(cache_dir=None):
    """Where download() keeps the val set (it may not be there yet)."""
    return os.path.join(cache_dir or DEFAULT_CACHE, "hellaswag_val.jsonl")


def download(cache_dir=None, url=VAL_URL):
    """Path of the val set, downloaded the first time into cache_dir (default ~/.cache/tritongpt)."""
    return fetch(url, cached_path(cache_dir), "the HellaSwag val set")


def iterate_examples(path):
    """The examples of a HellaSwag .jsonl file as dicts (fields ctx, endings, label, ...)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def render_example(example, enc):
    """(tokens (4, T) int64, mask (4, T) int64, label): row i is the context followed by ending i,
    right-padded with 0 to the longest row; mask is 1 exactly on ending i's tokens."""
    endings = example["endings"]
    if len(endings) != ENDINGS:
        raise ValueError(f"a HellaSwag example has {ENDINGS} endings, got {len(endings)}")
    context = enc.encode(example["ctx"])
    rows = [context + enc.encode(" " + ending) for ending in endings]
    width = max(len(row) for row in rows)
    tokens = torch.zeros((ENDINGS, width), dtype=torch.long)
    mask = torch.zeros((ENDINGS, width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(context):len(row)] = 1
    return tokens, mask, int(example["label"])


def ending_losses(logits, tokens, mask):
    """Mean cross-entropy over each row's masked tokens: (N, T, V), (N, T), (N, T) -> (N,) fp32.

    The logits at position t predict token t + 1, so a token is scored by the logits one step
    before it; the first token of a row is never scored (it is context)."""
    logits = logits[:, :-1].float()
    targets = tokens[:, 1:]
    weight = mask[:, 1:].to(logits.dtype)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (loss.view_as(weight) * weight).sum(1) / weight.sum(1)


def _pad(t, width):
    return F.pad(t, (0, width - t.shape[1]))


@torch.no_grad()
def _count_correct(model, rendered, device):
    """How many of the rendered examples the model gets right, scoring all their rows at once."""
    width = max(tokens.shape[1] for tokens, _, _ in rendered)
    tokens = torch.cat([_pad(t, width) for t, _, _ in rendered]).to(device)
    mask = torch.cat([_pad(m, width) for _, m, _ in rendered]).to(device)
    labels = torch.tensor([label for _, _, label in rendered], device=device)
    logits, _ = model(tokens)
    picks = ending_losses(logits, tokens, mask).view(-1, ENDINGS).argmin(1)
    return int((picks == labels).sum())


def evaluate(model, path, device, enc, rank=0, world_size=1, batch_size=8):
    """(num_correct_norm, num_total) over this rank's share of the examples.

    Rank r takes examples r, r + world_size, ...; summing both counts over ranks (all_reduce)
    gives the whole set's. batch_size examples (4 rows each, padded to the longest row; padding
    sits after every scored token, so a causal model's scores do not depend on it) go through
    the model at once. The model is called as `logits, _ = model(idx)`; put it in eval mode first,
    and under DDP pass the unwrapped module (ranks may run different numbers of batches, so no
    collective may happen inside the forward). Wrap the call in autocast to score in bf16.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    correct = total = 0
    pending = []
    for i, example in enumerate(iterate_examples(path)):
        if i % world_size != rank:
            continue
        pending.append(render_example(example, enc))
        if len(pending) == batch_size:
            correct, total = correct + _count_correct(model, pending, device), total + len(pending)
            pending = []
    if pending:
        correct, total = correct + _count_correct(model, pending, device), total + len(pending)
    return correct, total
