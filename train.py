"""Train GPT-2 with the tritongpt kernels: an offline demo, or the GPT-2 (124M) reproduction.

    python train.py                                        # offline demo: tiny model, bytes, a few CPU minutes
    python -m tritongpt.data.prepare fineweb-edu                     # once: 10B tokens of FineWeb-Edu as shards
    python train.py --data fineweb-edu                     # the GPT-2 124M recipe on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data fineweb-edu --compile   # on 8 GPUs
    python train.py --data fineweb-edu --resume auto       # continue from out/ckpt.pt
    python train.py --plot out/log.jsonl                   # redraw out/loss.png

The demo (--data demo, the default) trains the "tiny" preset on the docstrings of Python's
standard library as bytes: nothing is downloaded. Every other --data is GPT-2 BPE tokens in .npy
shards (vocabulary padded to 50304), trained with build-nanogpt's recipe: 524288 tokens a step by
gradient accumulation, AdamW (fused on CUDA; weight decay on 2-D parameters only), linear warmup
then cosine decay to a tenth, gradient clipping at 1.0, bf16 autocast on CUDA. Each step is
printed and appended to <out-dir>/log.jsonl; validation loss (and HellaSwag acc_norm for GPT-2
tokens) every --eval-every steps and at the end; a checkpoint every --ckpt-every steps and at the
end, from which --resume continues exactly; a non-finite loss stops the run, keeping the last
good checkpoint.
"""
import contextlib
import dataclasses
import inspect
import math
import os
import random
import sys
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from tritongpt.model.gpt import GPT, PRESETS, GPTConfig, flops_per_token, kernel_ops
from tritongpt.trainer import checkpoint, data, distributed, logs, options

GRAD_CLIP = 1.0
# Options that may change between a run and its resumption without changing its numbers.
RESUMABLE_CHANGES = ("resume", "out_dir", "device", "compile", "kernels", "log_every", "plot", "samples",
                     "hellaswag")


class Stop(Exception):
    """The run cannot go on (a non-finite loss); the message says why."""


def lr_at(step, args):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to a tenth."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(args, device):
    vocab = data.DEMO_VOCAB if args.data == "demo" else data.GPT2_VOCAB
    block = max(PRESETS[args.preset].get("block_size", GPTConfig.block_size), args.seq_len)
    config = GPTConfig.from_name(args.preset, vocab_size=vocab, block_size=block, kernels=args.kernels)
    kernel_ops(config, device)  # a kernels choice this device cannot run fails here, with its message
    return GPT(config).to(device)


def build_optimizer(model, args, device):
    """AdamW with weight decay on matrices and embeddings only (not biases, not LayerNorm gains)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_step(model, optimizer, loader, args, lr, device, procs):
    """One optimizer step over args.grad_accum micro-batches -> (loss averaged over ranks, grad norm).

    DDP all-reduces gradients only on the last micro-step; the others just accumulate locally.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    for micro in range(args.grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        if procs.distributed:
            model.require_backward_grad_sync = micro == args.grad_accum - 1
        with autocast(device):
            _, loss = model(x, y)
        loss = loss / args.grad_accum  # the mean over the whole step, not a sum of means
        loss_sum += loss.detach()
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    return distributed.mean_over_ranks(loss_sum, procs), norm


@torch.no_grad()
def val_loss(model, loader, args, device, procs):
    """Mean loss over args.eval_batches validation batches, always the same ones (the first)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(args.eval_batches):
        x, y = (t.to(device) for t in loader.next_batch())
        with autocast(device):
            total += model(x, y)[1].float()
    model.train()
    return distributed.mean_over_ranks(total / args.eval_batches, procs).item()


def hellaswag_file(args, procs):
    """The HellaSwag file to evaluate on, or None (demo runs, --hellaswag off, auto and not cached)."""
    if args.data == "demo" or args.hellaswag == "off":
        return None
    from tritongpt.data import hellaswag
    if args.hellaswag == "auto":
        path = hellaswag.cached_path()
        return path if os.path.isfile(path) else None
    try:
        if procs.main:  # one download, then the others find it cached
            hellaswag.download()
        distributed.barrier(procs)
        return hellaswag.download()
    except RuntimeError as err:  # offline: the message says where to put the file by hand
        raise ValueError(f"--hellaswag on: {err}") from err


def load_codec(args, hellaswag, procs):
    """The run's tokenizer, needed only for samples and HellaSwag; None when neither is on.
    Without it (offline, GPT-2 files not cached) samples are skipped with a note."""
    if not ((args.samples and procs.main) or hellaswag):
        return None
    try:
        return data.codec(args)
    except Exception as err:  # tiktoken fetches its files over the network on first use
        if hellaswag:
            raise ValueError(f"HellaSwag needs the GPT-2 tokenizer, which failed to load: {err}") from err
        print(f"note: no samples: the GPT-2 tokenizer failed to load ({type(err).__name__}: {err})", flush=True)
        return None


def hellaswag_accuracy(model, path, codec, device, procs):
    from tritongpt.data import hellaswag
    model.eval()
    with autocast(device):
        correct, total = hellaswag.evaluate(model, path, device, codec, rank=procs.rank,
                                            world_size=procs.world_size)
    model.train()
    correct, total = distributed.sum_over_ranks([correct, total], procs, device)
    return correct / total


def print_samples(model, codec, args, step, device):
    """args.samples continuations of a fixed prompt, drawn from an RNG of their own so that
    sampling never changes the training run's random numbers."""
    prompt = "The " if args.data == "demo" else "Hello, I'm a language model,"
    length = 200 if args.data == "demo" else 32
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + step)
        idx = torch.tensor([codec.encode(prompt)] * args.samples, device=device)
        with autocast(device):
            out = model.generate(idx, max_new_tokens=length, temperature=0.8, top_k=40)
    model.train()
    for row in out.tolist():
        print("sample:\n" + codec.decode(row), flush=True)


def save_checkpoint(path, model, optimizer, loader, step, args, procs):
    """All ranks call this: each contributes its RNG states and loader position; rank 0 writes."""
    per_rank = distributed.gather({"rng": checkpoint.rng_state(), "loader": loader.state_dict()}, procs)
    if procs.main:
        checkpoint.save(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": step, "args": vars(args), "config": dataclasses.asdict(model.config),
                               "ranks": per_rank})
    distributed.barrier(procs)


def restore(path, model, optimizer, loader, args, procs):
    """Load a checkpoint into the run; returns the number of steps it had done."""
    ckpt = checkpoint.load(path)
    if len(ckpt["ranks"]) != procs.world_size:
        raise ValueError(f"{path} was written by {len(ckpt['ranks'])} process(es); resume it with as many "
                         f"(this run has {procs.world_size})")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    mine = ckpt["ranks"][procs.rank]
    loader.load_state_dict(mine["loader"])
    checkpoint.set_rng_state(mine["rng"])
    changed = [k for k, v in ckpt["args"].items() if k not in RESUMABLE_CHANGES and getattr(args, k, v) != v]
    if procs.main:
        print(f"resumed {path} after step {ckpt['step']}"
              + (f"; options changed since: {', '.join(changed)}" if changed else ""), flush=True)
    return ckpt["step"]


def checkpoint_path(args):
    return os.path.join(args.out_dir, "ckpt.pt")


def resume_path(args):
    if args.resume == "auto":
        path = checkpoint_path(args)
        return path if os.path.isfile(path) else None
    return args.resume


def seed_everything(seed):
    """The same seed on every rank: identical initial weights everywhere."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def announce(args, model, procs, device, start):
    ops = ",".join(sorted(kernel_ops(model.config, device))) or "none"
    print(f"data {args.data}; model {args.preset} {model.num_params() / 1e6:.2f}M parameters, "
          f"kernels {args.kernels!r} -> {ops}; device {device} x {procs.world_size}; "
          f"{args.total_batch:,} tokens/step = {args.batch_size} x {args.seq_len} x {procs.world_size} x "
          f"{args.grad_accum} accumulation; steps {start + 1}..{args.max_steps}", flush=True)


def evaluate(step, model, forward_model, val_loader, hellaswag, codec, log, args, device, procs):
    """Validation loss (and HellaSwag) on every rank; rank 0 logs them and prints samples."""
    result = {"step": step, "val_loss": val_loss(forward_model, val_loader, args, device, procs)}
    if hellaswag:
        result["hellaswag"] = hellaswag_accuracy(model, hellaswag, codec, device, procs)
    if procs.main:
        log.write(result)
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()),
              flush=True)
        if codec and args.samples:
            print_samples(model, codec, args, step, device)


def step_record(step, loss, norm, lr, seconds, flops_tok, peak, args, procs):
    """A step's log.jsonl line; MFU is per GPU, against the device's dense bf16 peak."""
    tokens_per_s = args.total_batch / seconds
    mfu = flops_tok * tokens_per_s / (peak * procs.world_size) if peak else None
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "ms": 1000 * seconds,
            "tokens_per_s": tokens_per_s, "mfu": mfu}


def run(args, procs, device):
    train_loader = data.loader(args, "train", procs)  # first: missing data fails fast
    val_loader = data.loader(args, "val", procs)
    seed_everything(args.seed)
    model = build_model(args, device)
    optimizer = build_optimizer(model, args, device)
    ckpt_path = checkpoint_path(args)
    resume = resume_path(args)
    start = restore(resume, model, optimizer, train_loader, args, procs) if resume else 0
    log = logs.JsonLog(os.path.join(args.out_dir, "log.jsonl"), resume_step=start) if procs.main else None
    hellaswag = hellaswag_file(args, procs)
    codec = load_codec(args, hellaswag, procs)
    forward_model = torch.compile(model) if args.compile else model
    train_model = forward_model
    if procs.distributed:
        train_model = DistributedDataParallel(forward_model, device_ids=[device.index] if device.type == "cuda" else None)
    flops_tok = flops_per_token(model.num_params(), model.config.n_layer, model.config.n_embd, args.seq_len)
    peak = logs.peak_flops(device)
    if procs.main:
        announce(args, model, procs, device, start)

    for step in range(start + 1, args.max_steps + 1):
        t0 = time.time()
        lr = lr_at(step - 1, args)
        loss, norm = train_step(train_model, optimizer, train_loader, args, lr, device, procs)
        loss, norm = loss.item(), norm.item()  # waits for the GPU, so the time below is the step's
        seconds = time.time() - t0
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise Stop(f"loss {loss}, grad norm {norm} at step {step}: stopping. The last good checkpoint "
                       f"is {checkpoint.describe(ckpt_path)}; resume from it with a lower --lr or more "
                       "--warmup-steps")
        if procs.main:
            record = step_record(step, loss, norm, lr, seconds, flops_tok, peak, args, procs)
            log.write(record)
            if step % args.log_every == 0 or step in (start + 1, args.max_steps):
                print(logs.format_step(record), flush=True)
        if step % args.eval_every == 0 or step == args.max_steps:
            evaluate(step, model, forward_model, val_loader, hellaswag, codec, log, args, device, procs)
        if step % args.ckpt_every == 0 or step == args.max_steps:
            save_checkpoint(ckpt_path, model, optimizer, train_loader, step, args, procs)
    if procs.main:
        png = logs.plot_log(log.path)
        print(f"log {log.path}; " + (f"plot {png}" if png else "no plot (matplotlib is not installed)"), flush=True)


def main(argv=None):
    procs = distributed.from_env()
    args = options.parse_args(argv, __doc__, procs.world_size)
    if args.plot:
        if not os.path.isfile(args.plot):
            sys.exit(f"train.py: --plot {args.plot!r}: no such file")
        png = logs.plot_log(args.plot)
        if png is None:
            sys.exit("train.py: --plot needs matplotlib (pip install matplotlib)")
        print(png)
        return
    try:
        device = distributed.pick_device(args.device, procs)
        distributed.join(procs, device)
        run(args, procs, device)
    except (ValueError, FileNotFoundError, ImportError, Stop) as err:
        sys.exit(f"train.py: {err}")
    finally:
        distributed.leave(procs)


if __name__ == "__main__":
    main()
