"""Train a GPT-2-style model with the tritongpt kernels.

    python train.py                 # offline demo: the "tiny" preset on an embedded corpus, a few minutes on a CPU

The demo's corpus is built from the docstrings of Python's standard library, which every machine
with Python has, and is tokenized as raw bytes (vocabulary 256), so nothing is downloaded. The
loss is printed as it falls and a sample is printed at the end. The full GPT-2 124M recipe
(FineWeb-Edu shards, gradient accumulation, checkpoints, evaluation) is not built yet.
"""
import argparse
import importlib
import inspect
import math
import sys
import time

import torch

from model.gpt import GPT, GPTConfig

# Standard-library modules whose documentation makes the demo corpus.
CORPUS_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io", "itertools",
    "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "statistics",
    "string", "subprocess", "tempfile", "textwrap", "threading", "unittest", "urllib.parse",
)


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


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--kernels", default="auto", help='"auto", "all", "none" or a comma list of ops')
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    for flag in ("batch_size", "seq_len", "max_steps", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.lr > 0 or args.warmup_steps < 0:
        p.error("--lr must be positive and --warmup-steps non-negative")
    return args


def lr_at(step, args):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def batches(data, args, generator):
    """Random windows of seq_len + 1 bytes: inputs and next-byte targets."""
    while True:
        starts = torch.randint(len(data) - args.seq_len - 1, (args.batch_size,), generator=generator)
        window = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1].to(args.device), window[:, 1:].to(args.device)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        config = GPTConfig.from_name(args.preset, vocab_size=256, block_size=args.seq_len, kernels=args.kernels)
        model = GPT(config).to(args.device)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"train.py: {err}")
    data = torch.tensor(list(demo_corpus().encode("utf-8")), dtype=torch.long)
    print(f"demo corpus: {len(data):,} bytes; model: {model.num_params() / 1e6:.2f}M parameters "
          f"({args.preset}), kernels={args.kernels!r}, device={args.device}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    stream = batches(data, args, torch.Generator().manual_seed(args.seed))
    t0 = time.time()
    for step in range(args.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = next(stream)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.max_steps - 1:
            tok_s = (step + 1) * args.batch_size * args.seq_len / (time.time() - t0)
            print(f"step {step:5d} | loss {loss.item():.4f} | lr {lr_at(step, args):.2e} | "
                  f"grad norm {norm.item():.2f} | {tok_s:,.0f} tok/s", flush=True)
    model.eval()
    prompt = torch.tensor([list(b"The ")], device=args.device)
    sample = model.generate(prompt, max_new_tokens=200, temperature=0.8, top_k=40)[0].tolist()
    print("sample:\n" + bytes(sample).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
