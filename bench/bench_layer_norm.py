"""Benchmark LayerNorm: the Triton kernel against PyTorch eager, torch.compile and Liger-Kernel.

    python bench/bench_layer_norm.py [--quick] [--no-compile] [--out-dir bench/results]
    python -m tritongpt.bench.bench_layer_norm ...

Shapes: 16384 rows (GPT-2 124M's B*T) by C in {768, 1024, 1600, 4096}, bf16 activations and
parameters; modes fwd, bwd and fwd_bwd. Inputs require grad in every mode, so the forward is the
training forward (it keeps what its backward needs).

- fwd times y = layer_norm(x, w, b).
- bwd runs the forward once outside the timing and times y.backward(dy, retain_graph=True);
  do_bench sets x.grad, w.grad and b.grad to None before each timed run (grad_to_none, outside
  the timed region), so every run writes fresh gradients instead of accumulating.
- fwd_bwd times layer_norm(x, w, b).backward(dy), grads reset the same way.

GB/s counts the minimum bytes each mode must move, whatever a provider really moves:
  fwd:     read x, w, b; write y                                  2*N*C*e + 2*C*p
  bwd:     read x, dy, mean, rstd (fp32), w; write dx, dw, db       3*N*C*e + 8*N + 3*C*p
  fwd_bwd: the sum of the two
with N rows, e the activation itemsize and p the parameter itemsize. A forward that stores mean and
rstd moves 8*N more bytes than counted (under 1% here). `ceiling_frac` is that GB/s over the
measured device-to-device copy bandwidth (read + write of 1 GiB, stored as meta["copy_gbps"]).
Peak memory: harness.peak_memory_mb, i.e. what one call allocates beyond its inputs (for bwd, beyond
the saved forward graph too).

A provider that cannot run (Liger not installed, torch.compile failing) is reported in
meta["skipped"] (as "layer_norm:<provider>") and left out of the rows; the run goes on. The module
follows the benchmark protocol of bench/harness.py (OPS, collect, cases, main).
"""
import functools
import sys

import torch

from tritongpt.bench import harness

OP = "layer_norm"
OPS = (OP,)
ROWS = 16384
WIDTHS = (768, 1024, 1600, 4096)
QUICK_WIDTHS = (768, 4096)
MODES = harness.MODES
DTYPE = torch.bfloat16
EPS = 1e-5
OPTIONAL = ("torch_compile", "liger")  # providers whose failure skips them instead of stopping the run
SMOKE = {"ROWS": 64, "QUICK_WIDTHS": (96,)}  # a smoke run's shapes (harness.smoke_constants)


def layer_norm_bytes(rows, C, mode, itemsize=2, param_itemsize=None):
    """The minimum bytes one LayerNorm call of `mode` moves (see the module docstring)."""
    p = itemsize if param_itemsize is None else param_itemsize
    fwd = 2 * rows * C * itemsize + 2 * C * p
    bwd = 3 * rows * C * itemsize + 8 * rows + 3 * C * p
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


def providers(no_compile=False):
    """({name: fn(x, w, b)}, {name: why skipped}) for every provider this machine can offer."""
    from tritongpt.kernels import layer_norm, reference

    fns = {"triton": layer_norm, "torch": reference.layer_norm}
    skipped = {}
    if no_compile:
        skipped["torch_compile"] = "--no-compile"
    else:
        fns["torch_compile"] = torch.compile(reference.layer_norm, dynamic=False)
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError as e:
        skipped["liger"] = f"not installed ({e})"
    else:
        fns["liger"] = lambda x, w, b, eps=EPS: LigerLayerNormFunction.apply(x, w, b, eps)
    return fns, skipped


def make_inputs(C, device="cuda"):
    x = torch.randn(ROWS, C, device=device, dtype=DTYPE, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C, device=device, dtype=DTYPE)).requires_grad_()
    b = (0.1 * torch.randn(C, device=device, dtype=DTYPE)).requires_grad_()
    dy = torch.randn(ROWS, C, device=device, dtype=DTYPE)
    return x, w, b, dy


def runner(fn, mode, x, w, b, dy):
    """The callable to time for `mode` (for bwd, after running the forward once)."""
    if mode == "fwd":
        return lambda: fn(x, w, b, EPS)
    if mode == "bwd":
        y = fn(x, w, b, EPS)
        return lambda: y.backward(dy, retain_graph=True)
    return lambda: fn(x, w, b, EPS).backward(dy)


def prepare(fn, mode, inputs):
    """(callable to time, leaves whose grads are reset) of one provider in one mode."""
    x, w, b, dy = inputs
    return runner(fn, mode, x, w, b, dy), [x, w, b]


measure = harness.timer(prepare)  # (time_ms dict, peak MiB) of one provider in one mode


def run(widths, fns, skipped, copy_gbps, warmup, rep, device="cuda"):
    """Time every provider in every mode on every width; return the rows."""
    def metrics(shape, mode, ms):
        rate = harness.gbps(layer_norm_bytes(ROWS, shape["C"], mode, DTYPE.itemsize), ms)
        return dict(gbps=rate, ceiling_frac=rate / copy_gbps)

    points = [(f"C={C}", functools.partial(make_inputs, C, device), {"rows": ROWS, "C": C}) for C in widths]
    return harness.sweep(OP, fns, points, measure, warmup, rep, skipped, OPTIONAL, metrics, DTYPE)


def widths_for(args):
    return QUICK_WIDTHS if args.quick else WIDTHS


def collect(args):
    """The benchmark protocol (bench/harness.py): (rows, meta_extra) of one run on CUDA."""
    fns, skipped = providers(args.no_compile)
    skipped = harness.keyed_skips(OP, skipped)
    warmup, rep = harness.repetitions(args)
    copy_gbps = harness.copy_ceiling_gbps(args)
    print(f"measured copy bandwidth: {copy_gbps:.0f} GB/s")
    rows = run(widths_for(args), fns, skipped, copy_gbps, warmup, rep, device=harness.device())
    return rows, {"copy_gbps": round(copy_gbps, 1), "skipped": skipped}


def cases(args):
    """The protocol's pytest-benchmark cases: (id, setup) per width, provider and mode."""
    fns, _ = providers(args.no_compile)
    points = [(f"C{C}", functools.partial(make_inputs, C, harness.device())) for C in widths_for(args)]
    return harness.provider_cases(OP, fns, points, prepare)


def main(argv=None):
    return harness.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
