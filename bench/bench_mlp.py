"""Benchmark the GELU MLP: the fused Triton kernels against PyTorch eager and torch.compile.

    python bench/bench_mlp.py [--quick] [--no-compile] [--out-dir bench/results]
    python -m tritongpt.bench.bench_mlp ...

Shapes: 16384 rows (GPT-2 124M's B*T) by C in {768, 1024, 1280, 1600} (the GPT-2 widths), hidden
H = 4C, bf16 activations and parameters, both biases; modes fwd, bwd and fwd_bwd. Inputs require
grad in every mode, so the forward is the training forward (it keeps what its backward needs).

- triton: kernels.gelu_mlp (bias and GELU in the matmul epilogues).
- torch: kernels.reference.gelu_mlp in eager mode: cuBLAS matmuls with the bias, and a separate
  GELU kernel over the 4C-wide activation.
- torch_compile: torch.compile of the reference (Inductor's fusions and matmul choices).
- triton_gemm: kernels.gelu_mlp with kernels.mlp.PLAIN_GEMM = "triton": its four plain GEMMs
  (proj forward, dx, both weight gradients) by the project's Triton matmul instead of cuBLAS,
  the default; the rows against "triton" decide which backend the default should be.
Liger-Kernel has no GPT-2 (Linear -> GELU -> Linear) MLP, only gated ones, so it is not a provider.

- fwd times y = gelu_mlp(x, W1, b1, W2, b2).
- bwd runs the forward once outside the timing and times y.backward(dy, retain_graph=True);
  do_bench sets every input's .grad to None before each timed run (outside the timed region).
- fwd_bwd times gelu_mlp(...).backward(dy), grads reset the same way.

TFLOP/s counts the matmul FLOPs each mode must do, whatever a provider really does (the GELU and
the bias adds, O(N*H), are not counted), with N rows, C the width and H = 4C:
  fwd:     x W1^T and g W2^T                                  2 * 2*N*C*H = 4*N*C*H
  bwd:     dg = dy W2, dx = dh W1, dW1 = dh^T x, dW2 = dy^T g   4 * 2*N*C*H = 8*N*C*H
  fwd_bwd: the sum                                                          12*N*C*H
`ceiling_frac` is that TFLOP/s over the measured bf16 matmul ceiling (harness.matmul_tflops: one
8192 x 8192 x 8192 bf16 matmul, stored as meta["matmul_tflops"]). Peak memory:
harness.peak_memory_mb, what one call allocates beyond its inputs (for bwd, beyond the saved
forward graph too).

A provider that cannot run (torch.compile failing) is reported in meta["skipped"] (as
"mlp:<provider>") and left out of the rows; the run goes on. The module follows the benchmark
protocol of bench/harness.py (OPS, collect, cases, main).
"""
import functools
import sys

import torch

from tritongpt.bench import harness

OP = "mlp"
OPS = (OP,)
ROWS = 16384
WIDTHS = (768, 1024, 1280, 1600)
QUICK_WIDTHS = (768,)
MODES = harness.MODES
DTYPE = torch.bfloat16
OPTIONAL = ("torch_compile",)  # providers whose failure skips them instead of stopping the run
SMOKE = {"ROWS": 32, "QUICK_WIDTHS": (32,)}  # a smoke run's shapes (harness.smoke_constants)


def mlp_flops(rows, C, mode, hidden=None):
    """The matmul FLOPs of one MLP call of `mode` (see the module docstring); hidden defaults to 4C."""
    H = 4 * C if hidden is None else hidden
    return {"fwd": 4, "bwd": 8, "fwd_bwd": 12}[mode] * rows * C * H


def providers(no_compile=False):
    """({name: fn(x, w1, b1, w2, b2)}, {name: why skipped}) for every provider this machine can offer."""
    from tritongpt.kernels import gelu_mlp, reference

    def triton_gemm(*args):
        return gelu_mlp(*args)

    triton_gemm.plain_gemm = "triton"  # prepare() keeps it set through the backward too
    fns = {"triton": gelu_mlp, "triton_gemm": triton_gemm, "torch": reference.gelu_mlp}
    skipped = {"liger": "Liger-Kernel has no GPT-2 (non-gated GELU) MLP"}
    if no_compile:
        skipped["torch_compile"] = "--no-compile"
    else:
        fns["torch_compile"] = torch.compile(reference.gelu_mlp, dynamic=False)
    return fns, skipped


def make_inputs(C, device="cuda"):
    """x, W1, b1, W2, b2 (GPT-2's init scale) and an upstream gradient dy."""
    H = 4 * C
    x = torch.randn(ROWS, C, device=device, dtype=DTYPE, requires_grad=True)
    w1 = (0.02 * torch.randn(H, C, device=device, dtype=DTYPE)).requires_grad_()
    b1 = (0.02 * torch.randn(H, device=device, dtype=DTYPE)).requires_grad_()
    w2 = (0.02 * torch.randn(C, H, device=device, dtype=DTYPE)).requires_grad_()
    b2 = (0.02 * torch.randn(C, device=device, dtype=DTYPE)).requires_grad_()
    dy = torch.randn(ROWS, C, device=device, dtype=DTYPE)
    return x, w1, b1, w2, b2, dy


def runner(fn, mode, x, w1, b1, w2, b2, dy):
    """The callable to time for `mode` (for bwd, after running the forward once)."""
    if mode == "fwd":
        return lambda: fn(x, w1, b1, w2, b2)
    if mode == "bwd":
        y = fn(x, w1, b1, w2, b2)
        return lambda: y.backward(dy, retain_graph=True)
    return lambda: fn(x, w1, b1, w2, b2).backward(dy)


def _with_plain_gemm(backend, fn):
    """fn, run with kernels.mlp.PLAIN_GEMM = backend (restored after each call)."""
    from tritongpt.kernels import mlp

    def call(*args):
        saved, mlp.PLAIN_GEMM = mlp.PLAIN_GEMM, backend
        try:
            return fn(*args)
        finally:
            mlp.PLAIN_GEMM = saved
    return call


def prepare(fn, mode, inputs):
    """(callable to time, leaves whose grads are reset) of one provider in one mode. A provider
    with a plain_gemm attribute runs everything (the untimed forward of bwd too) on that backend."""
    backend = getattr(fn, "plain_gemm", None)
    if backend is None:
        return runner(fn, mode, *inputs), list(inputs[:5])
    timed = _with_plain_gemm(backend, runner)(fn, mode, *inputs)
    return _with_plain_gemm(backend, timed), list(inputs[:5])


measure = harness.timer(prepare)  # (time_ms dict, peak MiB) of one provider in one mode


def run(widths, fns, skipped, ceiling_tflops, warmup, rep, device="cuda"):
    """Time every provider in every mode on every width; return the rows."""
    def metrics(shape, mode, ms):
        rate = harness.tflops(mlp_flops(ROWS, shape["C"], mode), ms)
        return dict(tflops=rate, ceiling_frac=rate / ceiling_tflops)

    points = [(f"C={C}", functools.partial(make_inputs, C, device), {"rows": ROWS, "C": C, "H": 4 * C})
              for C in widths]
    return harness.sweep(OP, fns, points, measure, warmup, rep, skipped, OPTIONAL, metrics, DTYPE)


def widths_for(args):
    return QUICK_WIDTHS if args.quick else WIDTHS


def collect(args):
    """The benchmark protocol (bench/harness.py): (rows, meta_extra) of one run on CUDA."""
    fns, skipped = providers(args.no_compile)
    skipped = harness.keyed_skips(OP, skipped)
    warmup, rep = harness.repetitions(args)
    ceiling = harness.matmul_ceiling_tflops(args)
    print(f"measured bf16 matmul ceiling: {ceiling:.0f} TFLOP/s")
    rows = run(widths_for(args), fns, skipped, ceiling, warmup, rep, device=harness.device())
    return rows, {"matmul_tflops": round(ceiling, 1), "skipped": skipped}


def cases(args):
    """The protocol's pytest-benchmark cases: (id, setup) per width, provider and mode."""
    fns, _ = providers(args.no_compile)
    points = [(f"C{C}", functools.partial(make_inputs, C, harness.device())) for C in widths_for(args)]
    return harness.provider_cases(OP, fns, points, prepare)


def main(argv=None):
    return harness.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
