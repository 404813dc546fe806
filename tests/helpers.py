"""The correctness rule of DESIGN.md, in one place.

A kernel's result is compared with a float64 oracle (the reference on upcast inputs). Its error
must be at most 2x the error of PyTorch's own op run in the kernel's dtype, plus a small slack of
about one unit in the last place of the output's dtype at the oracle's largest magnitude. Both the
max-abs error and the relative RMS error must pass; failures print both for kernel and PyTorch.
"""
import math

import torch


def dtypes_for(device, bf16_in_interpreter=False):
    """fp32 and fp16 everywhere; bf16 on CUDA, and in the interpreter only for kernels that say it
    is right there (the interpreter's tl.dot multiplies bf16 bit patterns, elementwise code is fine)."""
    dts = [torch.float32, torch.float16]
    if torch.device(device).type == "cuda" or bf16_in_interpreter:
        dts.append(torch.bfloat16)
    return dts


def _errors(x, oracle):
    diff = x.double() - oracle
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    denom = oracle.pow(2).mean().sqrt().item() if oracle.numel() else 0.0
    rms = diff.pow(2).mean().sqrt().item() if diff.numel() else 0.0
    return max_abs, rms / denom if denom > 0 else rms


def assert_close_2x(actual, baseline, oracle, name, factor=2.0, slack=None, ulps=1.0):
    """Assert the kernel result `actual` is within `factor` x PyTorch's own error, plus a slack of
    `ulps` units in the last place of actual's dtype: at the oracle's largest magnitude for the
    max-abs error (or `slack`, an absolute slack, where that is larger), relative for the relative
    RMS error.

    actual:   the kernel's output or gradient
    baseline: PyTorch's own op on the same inputs in the same dtype, or a list of PyTorch
              implementations' results (PyTorch's error is then the largest)
    oracle:   the reference computed in float64 (or a higher precision than actual)
    """
    oracle = oracle.double().to(actual.device)
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite values where the oracle has none"
    baselines = list(baseline) if isinstance(baseline, (list, tuple)) else [baseline]
    for b in baselines:
        assert actual.shape == b.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(b.shape)}"
        assert actual.dtype == b.dtype, f"{name}: dtype {actual.dtype} != PyTorch's {b.dtype}"
    # PyTorch failing outright (fp16 LayerNorm with eps = 1e-12 underflows it to 0 and returns
    # nan) is no bar: the bar is then the oracle rounded to the dtype
    baselines = [b if torch.isfinite(b[finite]).all() else oracle.to(actual.dtype) for b in baselines]
    actual, oracle = actual[finite], oracle[finite]
    k_abs, k_rel = _errors(actual, oracle)
    t_abs, t_rel = (max(e) for e in zip(*(_errors(b[finite], oracle) for b in baselines)))
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    rel_slack = ulps * torch.finfo(actual.dtype).eps
    if slack:  # the absolute slack, relative to the oracle's RMS, for the relative error
        rms = oracle.pow(2).mean().sqrt().item() if oracle.numel() else 0.0
        rel_slack = max(rel_slack, slack / rms if rms > 0 else math.inf)
    slack = max(ulps * torch.finfo(actual.dtype).eps * max(scale, 1e-30), slack or 0.0)
    msg = (f"{name} ({actual.dtype}): kernel max-abs {k_abs:.3e} rel-rms {k_rel:.3e}; "
           f"PyTorch max-abs {t_abs:.3e} rel-rms {t_rel:.3e}; allowed {factor}x + "
           f"{slack:.1e} abs / {rel_slack:.1e} rel")
    assert k_abs <= factor * t_abs + slack, msg
    assert k_rel <= factor * t_rel + rel_slack, msg


def forbid_launches(monkeypatch, module, *kernel_names):
    """Make launching any of module's named Triton kernels fail the test (for input checks that
    must raise before a kernel runs)."""
    class Forbidden:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched before the input check")
    for name in kernel_names:
        monkeypatch.setattr(module, name, Forbidden())


_can_compile = None


def compile_fullgraph(fn, backend="inductor"):
    """torch.compile(fn, fullgraph=True), or skip the test where this machine cannot compile at all
    (no C++ compiler for inductor, say). The check compiles a trivial function once, so a graph
    break or an error in fn itself still fails the test. backend="aot_eager" traces the same
    graph (dynamo, fake tensors, autograd) without generating code: quicker, and needs no check."""
    import pytest

    global _can_compile
    if backend != "inductor":
        return torch.compile(fn, fullgraph=True, backend=backend)
    if _can_compile is None:
        try:
            torch.compile(lambda t: t * 2 + 1, fullgraph=True)(torch.ones(3))
            _can_compile = ""
        except Exception as e:  # noqa: BLE001 (any failure means: no compiler here)
            _can_compile = f"{type(e).__name__}: {e}".splitlines()[0]
    if _can_compile:
        pytest.skip(f"torch.compile does not work on this machine ({_can_compile})")
    return torch.compile(fn, fullgraph=True)


def assert_compiled_matches_eager(fn, inputs, rtol=1e-6, atol=1e-6):
    """fn(*inputs) -> a scalar loss. Compiles fn (fullgraph: a graph break fails) and checks the
    loss and the gradient of every input against eager (skips where nothing can compile)."""
    compiled_fn = compile_fullgraph(fn)
    eager = [t.detach().clone().requires_grad_() for t in inputs]
    compiled = [t.detach().clone().requires_grad_() for t in inputs]
    want, got = fn(*eager), compiled_fn(*compiled)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)


def leaf(t, requires_grad=True):
    """A fresh leaf copy of t (None stays None), so every call under test starts its own graph.
    The copy keeps t's strides (a sliced or transposed input stays one; clone would make it dense);
    only an expanded t (stride 0) becomes contiguous, since its copy cannot keep the overlap."""
    if t is None:
        return None
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        copy = t.detach().clone()
    else:
        copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t.detach())
    return copy.requires_grad_(requires_grad)


def spy(monkeypatch, name, fn=None, calls=None):
    """Replace kernels.<name> by a wrapper that appends name to `calls` (a new list by default) and
    then runs fn (default: the current kernels.<name>); returns the list."""
    from tritongpt import kernels

    calls = [] if calls is None else calls
    fn = getattr(kernels, name) if fn is None else fn

    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    monkeypatch.setattr(kernels, name, wrapper, raising=False)
    return calls


OPS = ("layer_norm", "gelu_mlp", "flash_attention", "cross_entropy")


def spy_ops(monkeypatch):
    """Record every call of the kernels (still running them); returns the list of op names."""
    calls = []
    for name in OPS:
        spy(monkeypatch, name, calls=calls)
    return calls


def grads_by_name(model):
    return {name: p.grad for name, p in model.named_parameters()}


def check_same_maths(patched, baseline, oracle, run):
    """run(model) -> dict of named tensors (loss, logits...) after a backward; compares those and
    every parameter gradient of the patched model with the unpatched one under the 2x rule."""
    results = []
    for model in (patched, baseline, oracle):
        out = run(model)
        out.update((f"grad {n}", g) for n, g in grads_by_name(model).items())
        results.append(out)
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        assert_close_2x(results[0][name], results[1][name], results[2][name], name)


# Layouts torch can give a tensor argument: each builds a leaf `base` and a view of it with the
# wanted shape, so a test can request gradients (on the base) while the op sees the strided view.
LAYOUTS = ("contiguous", "offset", "slice", "transpose", "expand")


def _base_shape(kind, shape):
    shape = tuple(shape)
    if kind == "offset":
        return (math.prod(shape) + 3,)
    if kind == "slice":
        return shape[:-1] + (2 * shape[-1],)
    if kind == "transpose" and len(shape) >= 2:
        return shape[:-2] + (shape[-1], shape[-2])
    if kind == "expand":
        return (1,) + shape[1:]
    return shape


def viewer(kind, shape):
    """(base_shape, fn): fn(base) is a view of shape `shape` in layout `kind` over a tensor of
    base_shape: "offset" starts 3 elements into a larger storage, "slice" takes every other element
    of the last dimension, "transpose" swaps the last two (a 1-D tensor stays as it is), "expand"
    repeats one row with stride 0 along the first dimension."""
    shape = tuple(shape)
    fns = {
        "contiguous": lambda b: b,
        "offset": lambda b: b[3:].view(shape),
        "slice": lambda b: b[..., ::2],
        "transpose": lambda b: b.transpose(-1, -2) if len(shape) >= 2 else b,
        "expand": lambda b: b.expand(shape),
    }
    return _base_shape(kind, shape), fns[kind]


def _same(a, b):
    """Bitwise equality that counts nan as equal to nan."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) \
        and torch.equal(torch.isnan(a), torch.isnan(b))


def _run_views(fn, args, dtype, dy, grads, kwargs, strict=False, rounded_to=None):
    """fn(*views) and its backward with dy; args are (base, view_fn) pairs (base None: the
    argument is None) or plain values. Float bases become leaves of `dtype` (requiring grad where
    `grads` says so), and dy is cast to it; with rounded_to, bases and dy are first rounded to that
    dtype (the oracle sees the inputs the op under test sees). Returns [out] + the views' gradients
    (None where none was asked): what the op itself returns for each argument, before autograd sums a stride-0 view's gradient into its
    base (that fp32 sum is autograd's, and ill-conditioned sums of it would only compare rounding).
    strict: also assert that no input (base or plain tensor) is modified and that a second
    backward pass over the same graph gives bitwise the same gradients."""
    views, call = [], []
    for arg, want_grad in zip(args, grads):
        if not isinstance(arg, tuple):
            views.append(None)
            call.append(arg)
            continue
        base, view = arg
        if base is not None and base.is_floating_point():
            base = leaf((base if rounded_to is None else base.to(rounded_to)).to(dtype), want_grad)
        t = None if base is None else view(base)
        if want_grad and t is not None:
            t.retain_grad()
        views.append(t if want_grad else None)
        call.append(t)
    inputs = [t for t in call if isinstance(t, torch.Tensor)]
    before = [t.detach().clone() for t in inputs] if strict else []
    out = fn(*call, **kwargs)
    dy = dy(out) if callable(dy) else dy
    dy = dy if rounded_to is None else dy.to(rounded_to)
    wanted = [t for t in views if t is not None]
    if out.requires_grad:
        out.backward(dy.to(out.dtype), retain_graph=strict)
    got = [out] + [None if t is None else t.grad for t in views]
    if strict and out.requires_grad:
        first = [t.grad.clone() for t in wanted]
        for t in wanted:
            t.grad = None
        out.backward(dy.to(out.dtype))
        for i, (a, b) in enumerate(zip(first, [t.grad for t in wanted])):
            assert _same(a, b), f"gradient {i}: a second backward pass is not bitwise equal to the first"
    for i, (a, b) in enumerate(zip(inputs, before)):
        assert _same(a.detach(), b), f"input {i} was modified by the op"
    return got


def dot_ulps(dtype, dot_length):
    """The slack, in ulps, for results made of dot products of length dot_length that the kernel
    accumulates in fp32 for fp32 inputs: sqrt(dot_length) (else the default, one ulp).

    Accumulating in the output's own precision, a kernel's summation order is as good as
    PyTorch's but not the same, and two orders of a length-n dot round differently by about
    sqrt(n) ulps. Where the result then cancels (attention's dP - rowsum(dO * O) on a peaked
    softmax) one element carries all of it. Measured: fp32 dQ at D = 32, where the interpreter's
    numpy dot rounds one row of dP 2.5x worse than PyTorch's blocked GEMM (the kernel's arithmetic
    reproduced bit for bit in numpy), beyond each of 200 runs of PyTorch on head-permuted inputs.
    Lower precisions accumulate in fp32, far below their output's ulp: one ulp stays the slack."""
    if dtype != torch.float32 or dot_length is None:
        return 1.0
    return math.sqrt(max(dot_length, 1))


def dot_bound_slack(a, b, dtype):
    """u * max(|a| @ |b|), u the unit roundoff of dtype: the first-order bound on the error of a @ b
    when one operand is rounded to dtype before the product (as a tensor-core matmul takes it).
    It is the error scale where the exact product cancels to 0, which the oracle's own magnitude
    (the default slack's scale) does not see."""
    return torch.finfo(dtype).eps / 2 * (a.double().abs() @ b.double().abs()).max().item() if a.numel() and b.numel() \
        else 0.0


def assert_differential(kernel, reference, args, dtype, dy, grads, names, strict=False, dot_length=None,
                        also=(), slacks=None, **kwargs):
    """The 2x rule for the output and every requested gradient of kernel(*views), against
    reference in float64 (the oracle) and reference in `dtype` (PyTorch's own error).
    args: (base, view_fn) pairs, see viewer(), or plain values (targets, None); grads: one bool per
    argument, whether its base requires grad; dy: the output gradient, or a function of the
    output giving it. Gradients are compared on the views the op receives. strict: see _run_views.
    dot_length: the length of the fp32 dot products the results are made of (see dot_ulps).
    also: other PyTorch implementations of the same maths in another algorithm's rounding (the
    kernel's own, tests/fa2.py): PyTorch's error is then the largest of them and reference's.
    slacks: {name: absolute slack} for results whose exact value may cancel to 0 (see
    dot_bound_slack)."""
    # the oracle starts from the inputs rounded to `dtype`: what input rounding costs is no one's error
    oracle = _run_views(reference, args, torch.float64, dy, grads, kwargs, rounded_to=dtype)
    baselines = [_run_views(fn, args, dtype, dy, grads, kwargs) for fn in (reference, *also)]
    actual = _run_views(kernel, args, dtype, dy, grads, kwargs, strict=strict)
    for i, (name, a, o) in enumerate(zip(names, actual, oracle)):
        if o is not None:
            assert a is not None, f"{name}: no gradient where the reference has one"
            assert_close_2x(a, [b[i] for b in baselines], o, name, ulps=dot_ulps(dtype, dot_length),
                            slack=(slacks or {}).get(name))
    return actual


# What stubbed benchmark timers report for every run (stub_timers).
TIMING = {"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}


def stub_timers(monkeypatch):
    """Make bench.harness's timer and peak-memory probe run the timed callable once and report
    TIMING and 1 MiB: benchmark code then runs for real on CPU without its GPU-only timing."""
    from tritongpt.bench import harness

    monkeypatch.setattr(harness, "time_ms", lambda fn, warmup, rep, grad_to_none: (fn(), dict(TIMING))[1])
    monkeypatch.setattr(harness, "peak_memory_mb", lambda fn: (fn(), 1.0)[1])
