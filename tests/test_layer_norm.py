"""kernels.layer_norm against the reference, under DESIGN.md's 2x rule."""
import importlib

import numpy as np
import pytest
import torch
from helpers import assert_close_2x, assert_compiled_matches_eager, dtypes_for, forbid_launches, leaf, viewer

from tritongpt.kernels import layer_norm, reference

# The package exports the function under the module's name, so fetch the module itself.
ln_module = importlib.import_module("tritongpt.kernels.layer_norm")

# The kernel has no tl.dot, so the interpreter computes bf16 correctly: test it on CPU too.
DTYPES = dtypes_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"), bf16_in_interpreter=True)


def _run(fn, x, w, b, dy):
    """Forward and backward through fn; returns [y, dx, dw, db] (None where an input is None)."""
    x, w, b = leaf(x), leaf(w), leaf(b)
    y = fn(x, w, b, 1e-5)
    y.backward(dy)
    return [y] + [None if t is None else t.grad for t in (x, w, b)]


def _check_against_reference(x, w, b, dy):
    """Kernel vs PyTorch in x's dtype vs the float64 reference, for y and every gradient."""
    up = [None if t is None else t.double() for t in (x, w, b, dy)]
    oracle = _run(reference.layer_norm, *up)
    baseline = _run(reference.layer_norm, x, w, b, dy)
    actual = _run(layer_norm, x, w, b, dy)
    for name, a, t, o in zip(("y", "dx", "dweight", "dbias"), actual, baseline, oracle):
        if o is not None:
            assert_close_2x(a, t, o, name)


def _inputs(shape, dtype, device, affine=(True, True)):
    C = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (torch.randn(C, device=device) * 0.5 + 1).to(dtype) if affine[0] else None
    b = (torch.randn(C, device=device) * 0.1).to(dtype) if affine[1] else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 768), (37, 768), (3, 5, 100), (2, 4, 3, 1600), (9, 1), (2, 8192)],
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients(shape, dtype, device):
    x, w, b = _inputs(shape, dtype, device)
    _check_against_reference(x, w, b, torch.randn(shape, device=device).to(dtype))


@pytest.mark.parametrize("affine", [(True, False), (False, True), (False, False)],
                         ids=["no_bias", "no_weight", "neither"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_without_weight_or_bias(affine, dtype, device):
    x, w, b = _inputs((19, 768), dtype, device, affine)
    _check_against_reference(x, w, b, torch.randn(19, 768, device=device).to(dtype))


@pytest.mark.parametrize("layout", ["strided_columns", "row_slice", "transposed", "batch_slice"])
def test_non_contiguous_input(layout, device):
    big = torch.randn(6, 10, 2 * 96, device=device)
    x = {
        "strided_columns": big[:, :, ::2],  # column stride 2
        "row_slice": big[:, :, :96],  # row stride 192, a view
        "transposed": big[:, :, :96].transpose(0, 1),  # leading dims permuted: reshape must copy
        "batch_slice": big[::2, 1:, 5:101],
    }[layout]
    assert not x.is_contiguous()
    _, w, b = _inputs((96,), torch.float32, device)
    _check_against_reference(x, w, b, torch.randn(x.shape, device=device))


@pytest.mark.parametrize("layout", ["slice", "expand", "offset"])
def test_strided_weight_and_bias(layout, device):
    """weight and bias are read through their strides: a slice, a stride-0 expand (which must not
    read past its one-element storage) and a view into a larger storage."""
    C = 48
    x = torch.randn(5, C, device=device)
    dy = torch.randn(5, C, device=device)
    base_shape, view = viewer(layout, (C,))
    w_base = torch.randn(base_shape, device=device) * 0.5 + 1
    b_base = torch.randn(base_shape, device=device)

    def run(fn, dtype):
        bases = [leaf(t.to(dtype)) for t in (x, w_base, b_base)]
        y = fn(bases[0], view(bases[1]), view(bases[2]), 1e-5)
        y.backward(dy.to(dtype))
        return [y] + [t.grad for t in bases]

    oracle, baseline, actual = run(reference.layer_norm, torch.float64), run(reference.layer_norm, x.dtype), \
        run(layer_norm, x.dtype)
    for name, a, t, o in zip(("y", "dx", "dweight", "dbias"), actual, baseline, oracle):
        assert_close_2x(a, t, o, f"{layout} {name}")


@pytest.mark.parametrize("eps", [1e-5, 1e-12], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_constant_rows_give_the_bias_exactly(eps, dtype, device):
    """x - mean must be exactly 0 on a constant row: a rounding error in the mean would be divided
    by sqrt(eps) (1.5e-2 at eps 1e-12 before the fix). PyTorch returns the bias exactly."""
    x = torch.full((3, 768), 0.1, device=device, dtype=dtype)
    w = torch.randn(768, device=device, dtype=dtype)
    b = torch.randn(768, device=device, dtype=dtype)
    y = layer_norm(x, w, b, eps=eps)
    assert torch.equal(y, b.expand_as(y))
    if dtype == torch.float32:  # PyTorch agrees bit for bit (its CPU fp16 path does not)
        assert torch.equal(reference.layer_norm(x, w, b, eps=eps), y)


def test_numpy_eps_is_accepted(device):
    x, w, b = _inputs((3, 16), torch.float32, device)
    want = reference.layer_norm(x, w, b, eps=1e-5)
    torch.testing.assert_close(layer_norm(x, w, b, eps=np.float32(1e-5)), want)
    torch.testing.assert_close(layer_norm(x, w, b, eps=np.float64(1e-5)), want)


def test_broadcast_output_gradient(device):
    """y.sum().backward() hands the kernel a dy with all strides 0."""
    x, w, b = [leaf(t) for t in _inputs((7, 64), torch.float32, device)]
    layer_norm(x, w, b).sum().backward()
    xr, wr, br = [leaf(t.double()) for t in (x, w, b)]
    reference.layer_norm(xr, wr, br).sum().backward()
    for got, want in zip((x.grad, w.grad, b.grad), (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64(device):
    x, w, b = [leaf(t) for t in _inputs((3, 4, 10), torch.float64, device)]
    assert torch.autograd.gradcheck(lambda *a: layer_norm(*a, eps=1e-5), (x, w, b))


def test_backward_is_deterministic(device):
    # 203 rows of 64: several persistent programs, each with a partial sum of dw and db.
    x, w, b = [leaf(t) for t in _inputs((203, 64), torch.float16, device)]
    dy = torch.randn(203, 64, device=device).half()
    grads = []
    for _ in range(3):
        for t in (x, w, b):
            t.grad = None
        layer_norm(x, w, b).backward(dy)
        grads.append([x.grad.clone(), w.grad.clone(), b.grad.clone()])
    for later in grads[1:]:
        for g0, g1 in zip(grads[0], later):
            assert torch.equal(g0, g1)


def test_gradient_dtypes_follow_inputs(device):
    """fp16 x with fp32 parameters (a mixed-precision set-up): y and dx fp16, dw and db fp32."""
    x, _, _ = _inputs((11, 128), torch.float16, device)
    _, w, b = _inputs((128,), torch.float32, device)
    _check_against_reference(x, w, b, torch.randn(11, 128, device=device).half())


def test_only_requested_gradients(device):
    x, w, b = _inputs((5, 64), torch.float32, device)
    w.requires_grad_(True)
    layer_norm(x, w, b).sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None


def test_inputs_are_not_modified(device):
    x, w, b = [leaf(t) for t in _inputs((13, 96), torch.float32, device)]
    before = [t.detach().clone() for t in (x, w, b)]
    dy = torch.randn(13, 96, device=device)
    dy_before = dy.clone()
    layer_norm(x, w, b).backward(dy)
    for t, t0 in zip((x, w, b, dy), before + [dy_before]):
        assert torch.equal(t.detach(), t0)


def _count_saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return len(saved)


def test_nothing_saved_without_grad(device):
    x, w, b = _inputs((4, 32), torch.float32, device)
    assert _count_saved(lambda: layer_norm(x, w, b)) == 0
    xg = leaf(x)
    with torch.no_grad():
        assert _count_saved(lambda: layer_norm(xg, w, b)) == 0
    assert _count_saved(lambda: layer_norm(xg, w, b)) > 0


def test_statistics_are_not_written_without_grad(device, monkeypatch):
    x, w, b = _inputs((4, 32), torch.float32, device)
    seen = {}
    real = ln_module._layer_norm_fwd

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["stats"] = out[1:]
        return out

    monkeypatch.setattr(ln_module, "_layer_norm_fwd", spy)
    layer_norm(x, w, b)
    assert seen["stats"] == (None, None)


def test_empty_rows(device):
    x, w, b = [leaf(t) for t in _inputs((0, 768), torch.float32, device)]
    y = layer_norm(x, w, b)
    assert y.shape == (0, 768)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_autocast_keeps_input_dtype(device):
    """Documented policy: autocast leaves the op alone; math in fp32, result in x's dtype."""
    x, w, b = _inputs((6, 64), torch.float32, device)
    fast = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.autocast(device.type, dtype=fast):
        y = layer_norm(x, w, b)
        y_half = layer_norm(x.to(fast), w, b)
    assert y.dtype == torch.float32 and y_half.dtype == fast
    torch.testing.assert_close(y, layer_norm(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(y_half, layer_norm(x.to(fast), w, b), rtol=0, atol=0)


def test_torch_compile_fullgraph(device):
    """The custom ops trace whole (no graph break) and compiled forward and backward match eager."""
    def loss(x, w, b):
        return (layer_norm(x * 2, w, b) ** 2).sum()

    assert_compiled_matches_eager(loss, _inputs((6, 40), torch.float32, device))


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if any layer-norm kernel is launched."""
    forbid_launches(monkeypatch, ln_module, "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")


@pytest.mark.parametrize("case, error, words", [
    ("int_x", TypeError, "x must have dtype"),
    ("list_x", TypeError, "x must be a torch.Tensor"),
    ("scalar_x", ValueError, "x must have at least 1"),
    ("weight_shape", ValueError, "weight must have shape (64,)"),
    ("bias_shape", ValueError, "bias must have shape (64,)"),
    ("int_weight", TypeError, "weight must have dtype"),
    ("weight_device", ValueError, "weight is on meta"),
    ("eps", ValueError, "eps must be a positive number"),
    ("too_wide", ValueError, "C) must be in [1, 16384]"),
])
def test_bad_input(case, error, words, device, no_launch):
    x, w, b = _inputs((4, 64), torch.float32, device)
    args = {
        "int_x": (x.long(), w, b), "list_x": ([1.0, 2.0], w, b), "scalar_x": (x[0, 0], None, None),
        "weight_shape": (x, w[:63], b), "bias_shape": (x, w, b.view(1, 64)),
        "int_weight": (x, w.int(), b), "weight_device": (x, w.to("meta"), b),
        "eps": (x, w, b, 0.0), "too_wide": (torch.zeros(1, 16385, device=device), None, None),
    }[case]
    with pytest.raises(error) as info:
        layer_norm(*args)
    assert words in str(info.value)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch, no_launch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Triton cannot run"):
        layer_norm(torch.randn(2, 8), None, None)


@pytest.mark.gpu
def test_offsets_past_int32_on_gpu():
    """Over 2**31 elements: row offsets must be computed in int64."""
    rows, C = (2**31 // 1024) + 3, 1024
    x = torch.randn(rows, C, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, device="cuda", dtype=torch.bfloat16)
    y = layer_norm(x, w, None)
    tail = slice(rows - 4, rows)
    torch.testing.assert_close(y[tail].float(), reference.layer_norm(x[tail].float(), w.float(), None),
                               rtol=2e-2, atol=2e-2)


class _Counted:
    """A Triton kernel that counts its launches; `inside` is true while one runs (the interpreter's
    own tensor traffic is not the launcher's)."""
    inside = False

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts.append(self.name)
            _Counted.inside = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                _Counted.inside = False
        return launch


def test_backward_is_two_launches_and_no_torch_compute(device, monkeypatch):
    """dx, dweight and dbias (bf16 parameters: a cast is needed) come from the row kernel and one
    reduction kernel: no zero-fill, sum or cast in torch. inspect's op model counts the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tritongpt.kernels import inspect

    launches, aten = [], []
    for name in ("_layer_norm_bwd_kernel", "_layer_norm_bwd_reduce_kernel"):
        monkeypatch.setattr(ln_module, name, _Counted(getattr(ln_module, name), launches, name))

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not _Counted.inside:
                aten.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x, w, b = _inputs((37, 96), torch.float16, device)
    _, mean, rstd = ln_module._layer_norm_fwd(x, w, b, 1e-5, True)
    dy = torch.randn_like(x)
    with Record():  # the launcher the backward custom op runs (the op itself is opaque to the mode)
        dx, dw, db = ln_module._layer_norm_bwd(dy, x, w, mean, rstd, True, w.dtype, b.dtype)
    assert dx.dtype == dw.dtype == db.dtype == torch.float16
    assert launches == ["_layer_norm_bwd_kernel", "_layer_norm_bwd_reduce_kernel"]
    compute = [f for f in aten if not f.startswith(("empty", "view", "_unsafe_view", "reshape", "detach",
                                                    "ones_like", "new_empty", "t."))]
    assert compute == [], compute
    ops = {r["op"]: r for r in inspect.layer_norm_traffic(4096, 768)}
    assert ops["layer_norm bwd"]["launches"] == len(launches)
