"""Train GPT-2 with the tritongpt kernels: an offline demo, or the GPT-2 (124M) reproduction.

    python train.py                                        # offline demo: small model, bytes, < 5 CPU minutes
    python -m tritongpt.data.prepare fineweb-edu                     # once: 10B tokens of FineWeb-Edu as shards
    python train.py --data fineweb-edu                     # the GPT-2 124M recipe on one GPU
    torchrun --standalone --nproc_per_node=8 train.py --data fineweb-edu --compile   # on 8 GPUs
    python train.py --data fineweb-edu --doc-mask          # attention kept inside documents (<|endoftext|>)
    python train.py --resume out/ckpt.pt                   # continue a run (its options come with it)
    python -m tritongpt.sample out/ckpt.pt                 # text from a checkpoint
    python train.py --plot out/log.jsonl                   # redraw out/loss.png

The demo (--data demo, the default) trains a 0.8M-parameter model on the docstrings of Python's
standard library as bytes for at most --time-budget seconds: nothing is downloaded. Every other --data is GPT-2 BPE tokens in .npy
shards (vocabulary padded to 50304), trained with build-nanogpt's recipe: 524288 tokens a step by
gradient accumulation, AdamW (fused on CUDA; weight decay on 2-D parameters only), linear warmup
then cosine decay to a tenth, gradient clipping at 1.0, bf16 autocast on CUDA. Each step is
printed and appended to <out-dir>/log.jsonl; validation loss (and HellaSwag acc_norm for GPT-2
tokens) every --eval-every steps and at the end; a checkpoint every --ckpt-every steps and at the
end, from which --resume continues exactly; a non-finite loss or gradient norm stops the run
before the optimizer step, and a checkpoint is written only once its weights gave a finite loss.
"""
import dataclasses
import inspect
import math
import os
import random
import sys
import time

STARTED = time.time()  # --time-budget counts from here: start-up and the kernel check are in it

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tritongpt.model.gpt import GPT, PRESETS, GPTConfig, flops_per_token, kernel_ops  # noqa: E402
from tritongpt.trainer import checkpoint, data, distributed, kernel_check, logs, options, sampling  # noqa: E402
from tritongpt.trainer.sampling import autocast  # noqa: E402

GRAD_CLIP = 1.0


class Stop(Exception):
    """The run cannot go on (a non-finite loss); the message says why."""


def lr_at(step, args):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to a tenth."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(args, device):
    preset, overrides = options.model_preset(args.preset)
    block = max(PRESETS[preset].get("block_size", GPTConfig.block_size), args.seq_len)
    config = GPTConfig.from_name(preset, **{**overrides, "vocab_size": data.vocab_size(args),
                                            "block_size": block, "kernels": args.kernels,
                                            "doc_mask": args.doc_mask})  # GPT-2 tokens: <|endoftext|> = 50256
    kernel_ops(config, device)  # a kernels choice this device cannot run fails here, with its message
    return GPT(config).to(device)


def build_optimizer(model, args, device):
    """AdamW with weight decay on matrices and embeddings only (not biases, not LayerNorm gains)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if fused else {}))


def forward_backward(model, optimizer, loader, args, lr, device, procs):
    """One step's gradients over args.grad_accum micro-batches, clipped, NOT yet applied (the
    caller checks them first) -> (loss averaged over ranks, grad norm), both the same on every rank.

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
    length = 200 if args.data == "demo" else 32
    for text in sampling.sample_texts(model, codec, sampling.default_prompt(args), args.samples, length,
                                      args.seed + step, device):
        tqdm.write("sample:\n" + text)


def rank_states(loader, procs):
    """Every rank's RNG states and loader position, gathered (a collective: all ranks call it)."""
    return distributed.gather({"rng": checkpoint.rng_state(), "loader": loader.state_dict()}, procs)


def save_checkpoint(path, model, optimizer, step, args, ranks, procs):
    """All ranks call this; rank 0 writes the model and optimizer as they are now, as the state
    after `step` steps, with `ranks` (from rank_states) taken at that point."""
    saved = {k: v for k, v in vars(args).items() if k != "given"}
    if procs.main:
        checkpoint.save(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "step": step, "args": saved, "config": dataclasses.asdict(model.config),
                               "ranks": ranks})
    distributed.barrier(procs)


def restore(ckpt, path, model, optimizer, loader, procs):
    """Load a checkpoint into the run; returns the number of steps it had done."""
    if len(ckpt["ranks"]) != procs.world_size:
        raise ValueError(f"{path} was written by {len(ckpt['ranks'])} process(es); resume it with as many "
                         f"(this run has {procs.world_size})")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    mine = ckpt["ranks"][procs.rank]
    loader.load_state_dict(mine["loader"])
    checkpoint.set_rng_state(mine["rng"])
    return ckpt["step"]


def checkpoint_path(args):
    return os.path.join(args.out_dir, "ckpt.pt")


def resume_path(args):
    if args.resume == "auto":
        path = checkpoint_path(args)
        return path if os.path.isfile(path) else None
    return args.resume


def with_checkpoint(args):
    """(args, checkpoint or None): for --resume, the checkpoint, verified, and the run's options
    restored from it (options.resumed says which flags may change)."""
    path = resume_path(args)
    if not path:
        return args, None
    ckpt = checkpoint.load(path)
    if "out_dir" not in args.given:  # continue beside the checkpoint, wherever it was moved
        args.out_dir = os.path.dirname(os.path.abspath(path))
    return options.resumed(args, ckpt["args"], path), (path, ckpt)


def seed_everything(seed):
    """The same seed on every rank: identical initial weights everywhere."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def announce(args, model, procs, device, start):
    print(f"data {args.data}; model {args.preset} {model.num_params() / 1e6:.2f}M parameters; "
          f"device {device} x {procs.world_size}; {args.total_batch:,} tokens/step = {args.batch_size} x "
          f"{args.seq_len} x {procs.world_size} x {args.grad_accum} accumulation; steps {start + 1}.."
          f"{args.max_steps}, warmup {args.warmup_steps}"
          + (f"; at most {args.time_budget:.0f} s (--time-budget)" if args.time_budget else "")
          + ("; attention masked at <|endoftext|> (--doc-mask)" if args.doc_mask else ""), flush=True)
    if args.warmup_steps >= args.max_steps:
        print(f"note: --warmup-steps {args.warmup_steps} >= --max-steps {args.max_steps}: the learning "
              "rate never reaches its peak", flush=True)
    print(kernels_line(args, model, device), flush=True)
    if args.kernel_check:
        ok, lines = kernel_check.run_in_subprocess(device)
        for line in lines:
            print(line, flush=True)
        if not ok:
            print("note: the kernel check failed (above); training goes on with the kernels chosen", flush=True)


def kernels_line(args, model, device):
    """Which ops run as Triton kernels in this run, and on a CPU how to run them anyway."""
    ops = sorted(kernel_ops(model.config, device))
    if ops:
        return f"kernels {args.kernels!r}: Triton kernels train here: {', '.join(ops)}"
    if device.type == "cpu":
        return (f"kernels {args.kernels!r}: none in training (compiled Triton kernels need a CUDA GPU; "
                "on a CPU they run only in Triton's interpreter, far slower). To train with them here: "
                "TRITON_INTERPRET=1 python train.py --kernels all --max-steps 20 --time-budget 0")
    return f"kernels {args.kernels!r}: none in training (the PyTorch reference ops)"


def evaluate(step, model, forward_model, val_loader, hellaswag, codec, log, args, device, procs):
    """Validation loss (and HellaSwag) on every rank; rank 0 logs them and prints samples.
    Returns the validation loss."""
    result = {"step": step, "val_loss": val_loss(forward_model, val_loader, args, device, procs)}
    if hellaswag:
        result["hellaswag"] = hellaswag_accuracy(model, hellaswag, codec, device, procs)
    if procs.main:
        log.write(result)
        tqdm.write(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
        if codec and args.samples and math.isfinite(result["val_loss"]):
            print_samples(model, codec, args, step, device)
    return result["val_loss"]


def step_record(step, loss, norm, lr, seconds, flops_tok, peak, args, procs):
    """A step's log.jsonl line; MFU is per GPU, against the device's dense bf16 peak."""
    tokens_per_s = args.total_batch / seconds
    mfu = flops_tok * tokens_per_s / (peak * procs.world_size) if peak else None
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "ms": 1000 * seconds,
            "tokens_per_s": tokens_per_s, "mfu": mfu}


def out_of_time(args, procs, device):
    """The --time-budget, counted from the process's start, is spent (decided together, so every
    rank stops at the same step)."""
    if not args.time_budget:
        return False
    over = float(time.time() - STARTED > args.time_budget)
    return distributed.sum_over_ranks([over], procs, device)[0] > 0


def bad_numbers(loss, norm, step, ckpt_path):
    return Stop(f"loss {loss}, grad norm {norm} at step {step}: stopping before the optimizer step. "
                f"The last good checkpoint is {checkpoint.describe(ckpt_path)}; resume from it with a lower "
                "--lr or more --warmup-steps")


def run(args, procs, device, resume=None):
    """Train; resume is (path, checkpoint) to continue from, or None."""
    train_loader = data.loader(args, "train", procs)  # first: missing data fails fast
    val_loader = data.loader(args, "val", procs)
    seed_everything(args.seed)
    model = build_model(args, device)
    optimizer = build_optimizer(model, args, device)
    ckpt_path = checkpoint_path(args)
    start = restore(resume[1], resume[0], model, optimizer, train_loader, procs) if resume else 0
    if start >= args.max_steps:
        if procs.main:
            print(f"{resume[0]}: this run is finished ({start} of --max-steps {args.max_steps} steps "
                  f"done); to train further, pass a larger --max-steps", flush=True)
        return
    if procs.main:
        if resume:
            print(f"resumed {resume[0]} after step {start}", flush=True)
        log = logs.JsonLog(os.path.join(args.out_dir, "log.jsonl"), resume_step=start if resume else None,
                           overwrite=args.overwrite, old_checkpoint=ckpt_path)
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

    bar = tqdm(total=args.max_steps, initial=start, unit="step", mininterval=1.0, disable=not procs.main,
               dynamic_ncols=True, file=sys.stderr)
    begin, pending, step = time.time(), None, start
    for step in range(start + 1, args.max_steps + 1):
        t0 = time.time()
        if (step - 1) % args.ckpt_every == 0 and step - 1 > start:
            pending = rank_states(train_loader, procs)  # the state after step - 1, saved once proven finite
        lr = lr_at(step - 1, args)
        loss, norm = forward_backward(train_model, optimizer, train_loader, args, lr, device, procs)
        loss, norm = loss.item(), norm.item()  # waits for the GPU, so the time below is the step's
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise bad_numbers(loss, norm, step, ckpt_path)
        if pending:  # the weights of step - 1 just gave a finite loss: now they may be saved
            save_checkpoint(ckpt_path, model, optimizer, step - 1, args, pending, procs)
            pending = None
        optimizer.step()
        seconds = time.time() - t0
        stopping = step == args.max_steps or out_of_time(args, procs, device)
        if procs.main:
            record = step_record(step, loss, norm, lr, seconds, flops_tok, peak, args, procs)
            log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if step % args.log_every == 0 or step == start + 1 or stopping:
                tqdm.write(logs.format_step(record))
        if step % args.eval_every == 0 or stopping:
            final_val = evaluate(step, model, forward_model, val_loader, hellaswag, codec, log if procs.main else None,
                                 args, device, procs)
        if stopping:
            break
    bar.close()
    if not math.isfinite(final_val):
        raise Stop(f"validation loss {final_val} after step {step}: not saved. The last good checkpoint is "
                   f"{checkpoint.describe(ckpt_path)}")
    save_checkpoint(ckpt_path, model, optimizer, step, args, rank_states(train_loader, procs), procs)
    if procs.main:
        finish(args, step, begin, log, ckpt_path)


def finish(args, step, begin, log, ckpt_path):
    """The closing lines: why the run ended, where its files are."""
    seconds = time.time() - begin
    if step < args.max_steps:
        print(f"the --time-budget of {args.time_budget:.0f} s is spent after step {step} of {args.max_steps}; "
              f"`python train.py --resume {ckpt_path}` continues the run", flush=True)
    png = logs.plot_log(log.path)
    print(f"trained {step} steps in {seconds:.0f} s; checkpoint {ckpt_path} "
          f"(`python -m tritongpt.sample {ckpt_path}` writes text from it); log {log.path}; "
          + (f"plot {png}" if png else "no plot (matplotlib is not installed)"), flush=True)


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
        args, resume = with_checkpoint(args)
        device = distributed.pick_device(args.device, procs)
        distributed.join(procs, device, args.pg_timeout)
        run(args, procs, device, resume)
    except (ValueError, FileNotFoundError, ImportError, Stop, checkpoint.CheckpointError) as err:
        sys.exit(f"train.py: {err}")
    finally:
        distributed.leave(procs)


if __name__ == "__main__":
    main()
