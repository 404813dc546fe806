"""Benchmark causal attention: the Triton FlashAttention against SDPA's backends and the math reference.

    python bench/bench_attention.py [--quick] [--out-dir bench/results]
    python -m tritongpt.bench.bench_attention ...

Shapes: B = 16, H = 12 (GPT-2 124M), causal, bf16, T in {256, ..., 8192} at D = 64 (GPT-2's head
dim at every size) and at D = 128; --quick runs T in {1024, 4096} at D = 64. Modes fwd, bwd and
fwd_bwd; q, k, v (B, H, T, D) contiguous and requiring grad in every mode, so the forward is the
training forward (it keeps what its backward needs).

- triton = kernels.flash_attention; sdpa_flash, sdpa_cudnn, sdpa_efficient =
  F.scaled_dot_product_attention(is_causal=True) pinned to one backend with
  torch.nn.attention.sdpa_kernel; torch = the same pinned to the math backend (the plain-PyTorch
  reference: T x T scores materialised), run up to T = MATH_MAX_T only (beyond, its scores alone
  take tens of GB). torch.compile adds nothing here (it calls the same SDPA kernels), so
  --no-compile has no effect.
- bwd runs the forward once outside the timing and times out.backward(do, retain_graph=True);
  do_bench sets q.grad, k.grad and v.grad to None before each timed run. fwd_bwd times both.

TFLOP/s counts the matmul FLOPs of exact attention, whatever a provider really does: forward
4 * B * H * T * T * D (q @ k^T and p @ v), halved for the causal mask; backward 2.5x the forward
(five matmuls of that size: dv, dp, dq, dk and the recomputed scores); fwd_bwd 3.5x. Peak memory:
harness.peak_memory_mb, what one call allocates beyond its inputs. A backend that cannot run on
this GPU or shape (cuDNN missing, say) is reported in meta["skipped"] (as "attention:<provider>")
and left out; the run goes on. The module follows the benchmark protocol of bench/harness.py
(OPS, collect, cases, main).
"""
import functools
import sys

import torch

from tritongpt.bench import harness

OP = "attention"
OPS = (OP,)
B, H = 16, 12
SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)
HEAD_DIMS = (64, 128)
QUICK_SHAPES = ((1024, 64), (4096, 64))
MATH_MAX_T = 4096
MODES = harness.MODES
DTYPE = torch.bfloat16
CAUSAL = True
OPTIONAL = ("torch", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")  # failures skip, not stop
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                 "sdpa_efficient": "EFFICIENT_ATTENTION", "torch": "MATH"}
CUDA_ONLY = ("sdpa_cudnn", "sdpa_efficient")  # SDPA has no CPU version of these (smoke runs on CPU)
SMOKE = {"B": 1, "H": 2, "QUICK_SHAPES": ((32, 16),)}  # a smoke run's shapes (harness.smoke_constants)


def attention_flops(batch, heads, T, D, mode, causal=CAUSAL):
    """Matmul FLOPs of one attention call of `mode` (see the module docstring)."""
    fwd = 4 * batch * heads * T * T * D // (2 if causal else 1)
    return {"fwd": fwd, "bwd": 5 * fwd // 2, "fwd_bwd": 7 * fwd // 2}[mode]


def _pinned_sdpa(backend):
    """SDPA(causal) restricted to one backend; raises when that backend cannot take the inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, backend)

    def attend(q, k, v, causal=CAUSAL):
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attend


def providers(no_compile=False):
    """({name: fn(q, k, v)}, {name: why skipped}) for every provider this machine can offer.
    no_compile is accepted for the shared command line and changes nothing (see the docstring)."""
    from tritongpt.kernels import flash_attention

    fns = {"triton": flash_attention}
    skipped = {}
    for name, backend in SDPA_BACKENDS.items():
        if name in CUDA_ONLY and harness.device() != "cuda":
            skipped[name] = "needs CUDA"
            continue
        try:
            fns[name] = _pinned_sdpa(backend)
        except (ImportError, AttributeError) as e:  # an older torch without that backend
            skipped[name] = f"unavailable ({type(e).__name__}: {e})"
    return fns, skipped


def make_inputs(T, D, device="cuda"):
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, T, D, device=device, dtype=DTYPE)
    return q, k, v, do


def runner(fn, mode, q, k, v, do):
    """The callable to time for `mode` (for bwd, after running the forward once)."""
    if mode == "fwd":
        return lambda: fn(q, k, v, causal=CAUSAL)
    if mode == "bwd":
        out = fn(q, k, v, causal=CAUSAL)
        return lambda: out.backward(do, retain_graph=True)
    return lambda: fn(q, k, v, causal=CAUSAL).backward(do)


def prepare(fn, mode, inputs):
    """(callable to time, leaves whose grads are reset) of one provider in one mode."""
    q, k, v, do = inputs
    return runner(fn, mode, q, k, v, do), [q, k, v]


measure = harness.timer(prepare)  # (time_ms dict, peak MiB) of one provider in one mode


def _active(fns, skipped, T):
    """The providers to run at length T: the math reference only up to MATH_MAX_T."""
    if T <= MATH_MAX_T or "torch" not in fns:
        return dict(fns)
    skipped[f"{OP}:torch"] = f"math backend run only up to T={MATH_MAX_T} (its T x T scores do not fit beyond)"
    return {name: fn for name, fn in fns.items() if name != "torch"}


def run(shapes, fns, skipped, warmup, rep, device="cuda", progress=None):
    """Time every provider in every mode on every (T, D); return the rows. A provider that fails
    (optional ones only) is dropped from fns for the later shapes too. progress(rows, meta_extra),
    when given, is called after every shape (the suite saves what a cut-short run measured)."""
    rows = []
    for T, D in shapes:
        inputs = make_inputs(T, D, device)
        active = _active(fns, skipped, T)
        started = list(active)
        results = harness.measure_providers(active, MODES, measure, (inputs, warmup, rep), skipped, OPTIONAL,
                                            f"T={T} D={D}", prefix=f"{OP}:")
        shape = {"B": B, "H": H, "T": T, "D": D}
        for name, mode, (timing, mem) in results:
            rate = harness.tflops(attention_flops(B, H, T, D, mode), timing["ms"])
            rows.append(harness.make_row(OP, name, mode, DTYPE, shape, timing, tflops=rate, peak_mem_mb=mem))
        for name in started:
            if name not in active:  # it failed at this shape: measure_providers dropped it
                del fns[name]
        del inputs
        if device == "cuda":
            torch.cuda.empty_cache()
        if progress is not None:
            progress(rows, {"skipped": skipped})
    return rows


def shapes_for(args):
    """The (T, D) pairs of a run."""
    return QUICK_SHAPES if args.quick else tuple((T, D) for D in HEAD_DIMS for T in SEQ_LENS)


def collect(args):
    """The benchmark protocol (bench/harness.py): (rows, meta_extra) of one run on CUDA."""
    fns, skipped = providers(args.no_compile)
    skipped = harness.keyed_skips(OP, skipped)
    warmup, rep = harness.repetitions(args)
    rows = run(shapes_for(args), fns, skipped, warmup, rep, device=harness.device(),
               progress=getattr(args, "progress", None))
    return rows, {"skipped": skipped}


def cases(args):
    """The protocol's pytest-benchmark cases: (id, setup) per shape, provider and mode (the math
    reference only up to MATH_MAX_T)."""
    fns, _ = providers(args.no_compile)
    points = [(f"T{T}-D{D}", functools.partial(make_inputs, T, D, harness.device())) for T, D in shapes_for(args)]
    length = {label: make.args[0] for label, make in points}
    return harness.provider_cases(OP, fns, points, prepare,
                                  keep=lambda name, label: name != "torch" or length[label] <= MATH_MAX_T)


def main(argv=None):
    return harness.bench_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
