"""Benchmark cross-entropy and linear + cross-entropy: Triton against PyTorch eager, torch.compile, Liger.

    python bench/bench_cross_entropy.py [--quick] [--no-compile] [--out-dir bench/results]
    python -m tritongpt.bench.bench_cross_entropy ...

Shapes: N in {4096, 16384, 32768} rows (GPT-2 124M's B*T is 16384), V = 50257, bf16; linear
cross-entropy with C = 768 (GPT-2's lm_head). Modes fwd, bwd and fwd_bwd, loss "mean" with
ignore_index=-1 and a few rows ignored, as in training. Inputs require grad in every mode.

- op "cross_entropy": triton = kernels.cross_entropy, torch = reference.cross_entropy
  (F.cross_entropy on the materialised logits upcast to fp32), torch_compile of the reference,
  liger = Liger-Kernel's cross entropy (it writes the gradient into the logits in place).
- op "linear_cross_entropy": triton = kernels.linear_cross_entropy, torch = F.linear then
  F.cross_entropy (reference.linear_cross_entropy), torch_compile of it, liger = Liger's fused
  linear cross entropy, torch_chunked = PyTorch's own F.linear_cross_entropy with its chunked
  path (LinearCrossEntropyOptions(), which never holds the full logits), where the installed
  torch has it (2.13 and newer).
- bwd runs the forward once outside the timing and times loss.backward(retain_graph=True);
  gradients are set to None before each timed run (grad_to_none). fwd_bwd times both.
  Note: linear_cross_entropy (ours and Liger's) computes its gradients during the forward, so its
  fwd is most of the work and its bwd only scales them.

GB/s (cross_entropy) counts the minimum traffic: fwd reads the logits once; bwd reads them and
writes their gradient; fwd_bwd both. TFLOP/s (linear_cross_entropy) counts the matmuls: 2*N*C*V
for fwd, 4*N*C*V for bwd, 6*N*C*V for fwd_bwd, whatever a provider really does. Peak memory:
harness.peak_memory_mb, what one call allocates beyond its inputs. A provider that cannot run
(Liger not installed, torch.compile failing) is reported in meta["skipped"]; the run goes on.
The module follows the benchmark protocol of bench/harness.py (OPS, collect, cases, main).
"""
import functools
import sys

import torch

from tritongpt.bench import harness

OPS = ("cross_entropy", "linear_cross_entropy")
ROWS = (4096, 16384, 32768)
QUICK_ROWS = (16384,)
V = 50257
C = 768
MODES = harness.MODES
DTYPE = torch.bfloat16
IGNORE_INDEX = -1
OPTIONAL = ("torch_compile", "liger", "torch_chunked")  # providers whose failure skips them, not the run
SMOKE = {"QUICK_ROWS": (8,), "V": 500, "C": 32}  # a smoke run's shapes (harness.smoke_constants)


def cross_entropy_bytes(N, vocab, mode, itemsize=2):
    """Minimum bytes moved: the logits read once per pass, their gradient written once."""
    nv = N * vocab * itemsize
    return {"fwd": nv, "bwd": 2 * nv, "fwd_bwd": 3 * nv}[mode]


def linear_cross_entropy_flops(N, width, vocab, mode):
    """Matmul FLOPs: logits = x @ W.T forward; dx = g @ W and dW = g.T @ x backward."""
    return {"fwd": 2, "bwd": 4, "fwd_bwd": 6}[mode] * N * width * vocab


def providers(op, no_compile=False):
    """({name: fn(*inputs, targets)}, {name: why skipped}) for `op` on this machine."""
    from tritongpt import kernels
    from tritongpt.kernels import reference

    ours, ref = getattr(kernels, op), getattr(reference, op)
    fns = {"triton": ours, "torch": ref}
    skipped = {}
    if no_compile:
        skipped["torch_compile"] = "--no-compile"
    else:
        fns["torch_compile"] = torch.compile(ref, dynamic=False)
    try:  # the nn.Module wrappers: their signatures are stable across Liger versions
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        skipped["liger"] = f"not installed ({e})"
    else:
        ce = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        if op == "cross_entropy":
            fns["liger"] = lambda logits, targets, ignore_index: ce(logits, targets)
        else:
            fns["liger"] = lambda x, w, targets, ignore_index: fused(w, x, targets)
    if op == "linear_cross_entropy":
        chunked, why = _torch_chunked()
        if chunked is None:
            skipped["torch_chunked"] = why
        else:
            fns["torch_chunked"] = chunked
    return fns, skipped


def _torch_chunked():
    """(PyTorch's chunked linear cross-entropy as a provider, None), or (None, why not here)."""
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None, f"torch {torch.__version__} has no F.linear_cross_entropy (new in 2.13)"
    # allow_retain_graph: the bwd mode calls backward on one graph again and again
    options = torch.nn.LinearCrossEntropyOptions(allow_retain_graph=True)
    return (lambda x, w, targets, ignore_index:
            F.linear_cross_entropy(x, w, targets, ignore_index=ignore_index, options=options)), None


def make_inputs(op, N, device="cuda"):
    """The differentiable inputs of `op` (logits, or x and the lm_head weight) and the targets."""
    targets = torch.randint(0, V, (N,), device=device)
    targets[::50] = IGNORE_INDEX
    if op == "cross_entropy":
        return [torch.randn(N, V, device=device, dtype=DTYPE).requires_grad_()], targets
    x = torch.randn(N, C, device=device, dtype=DTYPE).requires_grad_()
    w = (0.02 * torch.randn(V, C, device=device, dtype=DTYPE)).requires_grad_()
    return [x, w], targets


def runner(fn, mode, tensors, targets):
    """The callable to time for `mode` (for bwd, after running the forward once)."""
    def forward():
        return fn(*tensors, targets, ignore_index=IGNORE_INDEX)

    if mode == "fwd":
        return forward
    if mode == "bwd":
        loss = forward()
        return lambda: loss.backward(retain_graph=True)
    return lambda: forward().backward()


def prepare(fn, mode, inputs):
    """(callable to time, leaves whose grads are reset) of one provider in one mode."""
    tensors, targets = inputs
    return runner(fn, mode, tensors, targets), tensors


measure = harness.timer(prepare)  # (time_ms dict, peak MiB) of one provider in one mode


def rate(op, N, mode, ms):
    """(gbps, tflops) of one row. linear_cross_entropy gets TFLOP/s for fwd_bwd only: the Triton
    forward already computes the gradients (reduction "mean") and its backward only scales them,
    so a per-pass FLOP count would credit the providers' fwd and bwd rows with different work."""
    if op == "cross_entropy":
        return harness.gbps(cross_entropy_bytes(N, V, mode), ms), None
    if mode != "fwd_bwd":
        return None, None
    return None, harness.tflops(linear_cross_entropy_flops(N, C, V, mode), ms)


def run(op, row_counts, fns, skipped, warmup, rep, device="cuda"):
    """Time every provider of `op` in every mode at every N; return the rows."""
    def metrics(shape, mode, ms):
        gb, tf = rate(op, shape["rows"], mode, ms)
        return dict(gbps=gb, tflops=tf)

    shape_extra = {"V": V} if op == "cross_entropy" else {"C": C, "V": V}
    points = [(f"N={N}", functools.partial(make_inputs, op, N, device), {"rows": N, **shape_extra})
              for N in row_counts]
    return harness.sweep(op, fns, points, measure, warmup, rep, skipped, OPTIONAL, metrics, DTYPE)


def row_counts_for(args):
    return QUICK_ROWS if args.quick else ROWS


def collect(args):
    """The benchmark protocol (bench/harness.py): (rows, meta_extra) of one run on CUDA."""
    warmup, rep = harness.repetitions(args)
    rows, skipped = [], {}
    for op in OPS:
        if not harness.wants(args, op):
            continue
        fns, op_skipped = providers(op, args.no_compile)
        skipped.update(harness.keyed_skips(op, op_skipped))
        rows += run(op, row_counts_for(args), fns, skipped, warmup, rep, device=harness.device())
    return rows, {"skipped": skipped}


def cases(args):
    """The protocol's pytest-benchmark cases: (id, setup) per op, N, provider and mode."""
    for op in OPS:
        if harness.wants(args, op):
            fns, _ = providers(op, args.no_compile)
            points = [(f"N{N}", functools.partial(make_inputs, op, N, harness.device()))
                      for N in row_counts_for(args)]
            yield from harness.provider_cases(op, fns, points, prepare)


def main(argv=None):
    return harness.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
