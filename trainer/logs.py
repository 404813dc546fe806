"""What a run reports: model FLOPs utilisation, the JSON-lines log and its loss plot.

    python train.py --plot out/log.jsonl     # -> out/loss.png (needs matplotlib)
"""
import json
import math
import os

import torch

# Dense bf16 tensor-core peak in FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(device):
    """The device's bf16 peak in FLOP/s, or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def format_step(record):
    """One console line for a step's record."""
    mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "-"
    return (f"step {record['step']:6d} | loss {record['loss']:.6f} | lr {record['lr']:.2e} | "
            f"norm {record['grad_norm']:.4f} | {record['ms']:.0f} ms | "
            f"{record['tokens_per_s']:,.0f} tok/s | mfu {mfu}")


class JsonLog:
    """Appends one JSON object a line; on resume drops the lines of steps after the checkpoint,
    so the log reads as one uninterrupted run. A new run (resume_step None) refuses to replace
    another run's log (and checkpoint, old_checkpoint) unless overwrite is set; then it removes
    that checkpoint too, so `--resume auto` never picks up the old run."""

    def __init__(self, path, resume_step=None, overwrite=False, old_checkpoint=None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            _replace_old_run(path, old_checkpoint, overwrite)
        kept = [r for r in read_log(path) if r["step"] <= resume_step] if resume_step is not None else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _replace_old_run(path, old_checkpoint, overwrite):
    old = [p for p in (path, old_checkpoint) if p and os.path.isfile(p) and os.path.getsize(p)]
    if not old:
        return
    if not overwrite:
        raise ValueError(f"{' and '.join(old)} belong to an earlier run; pass --overwrite to replace them, "
                         "--resume auto to continue that run, or another --out-dir")
    for p in old:
        os.remove(p)


def read_log(path):
    """The records of a log.jsonl. A half-written last line (a run killed mid-write) is dropped;
    a bad line elsewhere is a ValueError naming the file and line."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # cut off mid-write
            raise ValueError(f"{path}, line {n}: not a JSON record ({err.msg})") from None
    return records


def plot_log(path, png=None):
    """Draw training and validation loss (and HellaSwag accuracy, if logged) from a log.jsonl.
    Returns the PNG's path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_log(path)
    png = png or os.path.join(os.path.dirname(os.path.abspath(path)), "loss.png")
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    hella = [(r["step"], r["hellaswag"]) for r in records if "hellaswag" in r]
    fig, axes = plt.subplots(1, 2 if hella else 1, figsize=(12 if hella else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if len(points) < 30 else None)
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    if hella:
        axes[0][1].plot(*zip(*hella), marker="o")
        axes[0][1].set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
