"""kernels.mlp (the fused GELU MLP) against the reference, under DESIGN.md's 2x rule.

In the interpreter the hidden sizes and row counts stay small (C = 768 runs with a narrow hidden
layer); every shape leaves partial tiles along rows, C and the hidden size.
"""
import importlib

import pytest
import torch
from helpers import assert_close_2x, assert_differential, dtypes_for, forbid_launches, leaf, viewer

from tritongpt.kernels import gelu_mlp, reference

mlp_module = importlib.import_module("tritongpt.kernels.mlp")

# bf16 tiles are converted to fp32 before tl.dot in the interpreter, so bf16 is right there too.
DTYPES = dtypes_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"), bf16_in_interpreter=True)
NAMES = ("y", "dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias")


def _run(fn, inputs, dy, **kwargs):
    """Forward and backward through fn; [y, dx, dW1, db1, dW2, db2] (None where an input is None)."""
    leaves = [leaf(t) for t in inputs]
    y = fn(*leaves, **kwargs)
    y.backward(dy)
    return [y] + [None if t is None else t.grad for t in leaves]


def _check_against_reference(inputs, dy, **kwargs):
    """Kernel vs PyTorch in the inputs' dtype vs the float64 reference, for y and every gradient."""
    up = [None if t is None else t.double() for t in inputs]
    oracle = _run(reference.gelu_mlp, up, dy.double(), **kwargs)
    baseline = _run(reference.gelu_mlp, inputs, dy, **kwargs)
    actual = _run(gelu_mlp, inputs, dy, **kwargs)
    for name, a, t, o in zip(NAMES, actual, baseline, oracle):
        if o is not None:
            assert_close_2x(a, t, o, name)


def _inputs(lead, C, H, dtype, device, bias=True, O=None):
    """x (*lead, C) and GPT-2-like parameters: weights with std 0.02 * sqrt(768 / fan_in)-ish scale."""
    O = C if O is None else O
    x = torch.randn(*lead, C, device=device).to(dtype)
    w1 = (torch.randn(H, C, device=device) / C**0.5).to(dtype)
    b1 = (0.1 * torch.randn(H, device=device)).to(dtype) if bias else None
    w2 = (torch.randn(O, H, device=device) / H**0.5).to(dtype)
    b2 = (0.1 * torch.randn(O, device=device)).to(dtype) if bias else None
    return [x, w1, b1, w2, b2]


def _dy(inputs):
    x, _, _, w2, _ = inputs
    return torch.randn(*x.shape[:-1], w2.shape[0], device=x.device).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, C, H", [((67,), 64, 256), ((3, 29), 96, 160), ((5,), 768, 96)],
                         ids=["67x64-h256", "3x29x96-h160", "5x768-h96"])
def test_forward_and_gradients(lead, C, H, dtype, device):
    inputs = _inputs(lead, C, H, dtype, device)
    _check_against_reference(inputs, _dy(inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_exact_erf_gelu(dtype, device):
    inputs = _inputs((45,), 64, 96, dtype, device)
    _check_against_reference(inputs, _dy(inputs), approximate="none")



def _gelu_exact_fp64(h, approximate):
    """GELU in fp64 in forms without cancellation (F.gelu's 0.5 h (1 + tanh) and 0.5 h (1 + erf)
    lose all digits for h << 0): h sigmoid(2u) and 0.5 h erfc(-h / sqrt 2)."""
    if approximate == "tanh":
        return h * torch.sigmoid(2 * 0.7978845608028654 * (h + 0.044715 * h**3))
    return 0.5 * h * torch.special.erfc(-h * 0.7071067811865476)


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_fp32_activation_and_its_derivative_are_correctly_rounded(approximate, device):
    """With identity weights (C = H = O = 1, no biases) y = gelu(x) and dx = gelu'(x) exactly, so
    the epilogues' values show unblurred: for fp32 each must be the exact value correctly rounded
    (the epilogue computes in fp64; an fp32 exp and division are 1-2 ulp off on many of these x).
    x: multiples of 1/256 in [-5, 8], exact in TF32 too, so h = x whatever the dot; below -5 the
    erf form's 1 + erf(h / sqrt 2) loses fp32's digits even in fp64 (F.gelu loses all of them)."""
    x = torch.arange(-1280, 2049, device=device, dtype=torch.float32)[:, None] / 256
    one = torch.ones(1, 1, device=device)
    x.requires_grad_(True)
    y = gelu_mlp(x, one, None, one, None, approximate=approximate)
    y.backward(torch.ones_like(y))
    h = x.detach().double().requires_grad_(True)
    g = _gelu_exact_fp64(h, approximate)
    (dg,) = torch.autograd.grad(g, h, torch.ones_like(g))
    for name, actual, exact in (("y", y.detach(), g.detach()), ("dx", x.grad, dg)):
        best = (exact.float().double() - exact).abs()  # the correctly rounded value's error
        err = (actual.double() - exact).abs()
        worse = err > best + 1e-12 * exact.abs()
        assert not worse.any(), f"{name}: {int(worse.sum())} of {x.numel()} values not correctly rounded, " \
            f"e.g. x = {x[worse][0].item()}: {actual[worse][0].item()!r} vs {exact[worse][0].item()!r}"

def test_without_biases_and_other_output_width(device):
    inputs = _inputs((33,), 64, 80, torch.float32, device, bias=False, O=72)
    _check_against_reference(inputs, _dy(inputs))


@pytest.mark.parametrize("layout", ["slice", "expand", "offset"])
def test_strided_biases(layout, device):
    """fc_bias and proj_bias are read through their strides (an expanded one has stride 0)."""
    x, w1, b1, w2, b2 = _inputs((7,), 32, 48, torch.float32, device)
    args = [(x, lambda t: t), (w1, lambda t: t)]
    for bias, n in ((b1, 48), (b2, 32)):
        base_shape, view = viewer(layout, (n,))
        args.append((0.1 * torch.randn(base_shape, device=device), view))
    args.insert(3, (w2, lambda t: t))
    assert_differential(gelu_mlp, reference.gelu_mlp, args, torch.float32, _dy([x, w1, b1, w2, b2]),
                        [True] * 5, NAMES)


def test_empty_feature_dimension(device):
    """C = 0: F.linear returns the bias broadcast; so does the first layer here."""
    x, w1, b1, w2, b2 = _inputs((5,), 0, 16, torch.float32, device, O=4)
    _check_against_reference([x, w1, b1, w2, b2], torch.randn(5, 4, device=device))
    x, w1, b1, w2, b2 = _inputs((2, 5), 0, 16, torch.float32, device, O=8)
    _check_against_reference([x, w1, b1, w2, b2], torch.randn(2, 5, 8, device=device))


@pytest.mark.parametrize("layout", ["strided_columns", "transposed"])
def test_non_contiguous_input(layout, device):
    big = torch.randn(6, 11, 2 * 64, device=device)
    x = big[:, :, ::2] if layout == "strided_columns" else big[:, :, :64].transpose(0, 1)
    assert not x.is_contiguous()
    inputs = [x] + _inputs((1,), 64, 96, torch.float32, device)[1:]
    inputs[1] = inputs[1].t().contiguous().t()  # a transposed weight layout is read in place too
    _check_against_reference(inputs, _dy(inputs))


def test_split_k_weight_gradients(device, monkeypatch):
    """Weight gradients with K (the rows) split over programs: fp32 partials summed by torch."""
    splits = []
    real = mlp_module._split_k

    def spy(*args):
        splits.append(real(*args))
        return splits[-1]

    monkeypatch.setattr(mlp_module, "PLAIN_GEMM", "triton")
    monkeypatch.setattr(mlp_module, "MIN_K_PER_SPLIT", 64)
    monkeypatch.setattr(mlp_module, "_split_k", spy)
    inputs = _inputs((301,), 64, 96, torch.float16, device)
    _check_against_reference(inputs, _dy(inputs))
    assert splits and all(s > 1 for s, _ in splits)



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case, tma_expected", [
    ("contiguous", (True, True)),
    ("transposed_weights", (True, True)),  # W1 read as (K, N), W2 as (N, K): the other B orientation
    ("odd_hidden", (False, False)),  # H = 100: a 200-byte row of h is no multiple of 16 bytes
    ("strided_x", (False, True)),  # x's rows 82 bytes apart: fc reads it through pointers; dy is dense
])
def test_tma_kernel_and_its_fallbacks(case, tma_expected, dtype, device, monkeypatch):
    """fc + GELU and dh run the persistent TMA kernel where the device has TMA (Hopper, and the
    interpreter) and the copy engine can address every operand, the pointer kernel elsewhere; both
    meet the rule. 70 rows x 136 hidden span 9 tiles of the interpreter's config for 4 programs,
    with partial tiles along both edges, so each program walks several tiles."""
    taken = []
    real = mlp_module._tma_operands

    def spy(a, b):
        taken.append(real(a, b) is not None)
        return None if not taken[-1] else real(a, b)

    monkeypatch.setattr(mlp_module, "_tma_operands", spy)
    H = 100 if case == "odd_hidden" else 136
    inputs = _inputs((70,), 40, H, dtype, device)
    if case == "transposed_weights":
        inputs[1] = inputs[1].t().contiguous().t()
        inputs[3] = inputs[3].t().contiguous().t()
    if case == "strided_x":
        inputs[0] = torch.cat([inputs[0], inputs[0][:, :1]], 1)[:, :40]
    _check_against_reference(inputs, _dy(inputs))
    on_hopper = device.type == "cpu" or torch.cuda.get_device_capability(device)[0] >= 9
    assert taken == [on_hopper and t for t in tma_expected]


@pytest.mark.parametrize("backend", ["cublas", "triton"])
def test_plain_gemm_backends(backend, device, monkeypatch):
    """proj, dx, dW1 and dW2 through torch (cuBLAS) or the Triton matmul: both meet the rule, and
    the switch really changes who computes them (the Triton kernel runs only for "triton")."""
    launches = []
    real = mlp_module._matmul
    monkeypatch.setattr(mlp_module, "_matmul", lambda *a, **k: launches.append(k.get("gelu")) or real(*a, **k))
    monkeypatch.setattr(mlp_module, "PLAIN_GEMM", backend)
    inputs = _inputs((37,), 64, 96, torch.float16, device)
    _check_against_reference(inputs, _dy(inputs))
    plain = [g for g in launches if g is None]
    assert len(plain) == (4 if backend == "triton" else 0)


def test_unknown_plain_gemm_backend_is_refused(device, monkeypatch):
    monkeypatch.setattr(mlp_module, "PLAIN_GEMM", "cutlass")
    with pytest.raises(ValueError, match="PLAIN_GEMM"):
        gelu_mlp(*_inputs((2,), 8, 16, torch.float32, device))

def test_gradcheck_float64(device):
    inputs = [leaf(t) for t in _inputs((3,), 5, 7, torch.float64, device)]
    assert torch.autograd.gradcheck(gelu_mlp, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: gelu_mlp(*a, approximate="none"), inputs, fast_mode=True)


def test_backward_is_deterministic(device):
    inputs = [leaf(t) for t in _inputs((131,), 64, 96, torch.float16, device)]
    dy = _dy(inputs)
    grads = []
    for _ in range(2):
        for t in inputs:
            t.grad = None
        gelu_mlp(*inputs).backward(dy)
        grads.append([t.grad.clone() for t in inputs])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_broadcast_output_gradient_and_only_requested_gradients(device):
    """y.sum().backward() hands the kernels a dy with all strides 0; x alone requires grad."""
    x, w1, b1, w2, b2 = _inputs((9,), 64, 96, torch.float32, device)
    x.requires_grad_(True)
    gelu_mlp(x, w1, b1, w2, b2).sum().backward()
    xr = x.detach().double().requires_grad_(True)
    reference.gelu_mlp(xr, *(t.double() for t in (w1, b1, w2, b2))).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)
    assert all(t.grad is None for t in (w1, b1, w2, b2))


def test_nothing_saved_without_grad_and_inputs_unchanged(device):
    inputs = _inputs((4,), 32, 48, torch.float32, device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gelu_mlp(*inputs)
        assert saved == []
        leaves = [leaf(t) for t in inputs]
        y = gelu_mlp(*leaves)
    assert len(saved) == 5  # x, both weights, the pre-activation and the activation
    before = [t.detach().clone() for t in leaves]
    y.backward(_dy(inputs))
    assert all(torch.equal(t.detach(), t0) for t, t0 in zip(leaves, before))


def test_empty_rows(device):
    inputs = [leaf(t) for t in _inputs((0,), 64, 96, torch.float32, device)]
    y = gelu_mlp(*inputs)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in inputs[1:])


def test_autocast_casts_like_linear(device):
    inputs = _inputs((6,), 32, 48, torch.float32, device)
    fast = torch.float16 if device.type == "cuda" else torch.bfloat16
    with torch.autocast(device.type, dtype=fast):
        y = gelu_mlp(*inputs)
    assert y.dtype == fast
    torch.testing.assert_close(y, gelu_mlp(*(t.to(fast) for t in inputs)), rtol=0, atol=0)


def test_torch_compile_fullgraph(device):
    inputs = _inputs((13,), 32, 48, torch.float32, device)

    def loss(*args):
        return (gelu_mlp(*args) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    leaves, leaves_c = [leaf(t) for t in inputs], [leaf(t) for t in inputs]
    eager_loss, compiled_loss = loss(*leaves), compiled(*leaves_c)
    eager_loss.backward()
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    for a, b in zip(leaves_c, leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.fixture
def no_launch(monkeypatch):
    """Fails the test if any MLP kernel is launched."""
    forbid_launches(monkeypatch, mlp_module, "_mlp_fwd_tuned", "_mlp_fwd_gelu_tuned", "_mlp_bwd_tuned",
                    "_mlp_fc_tma_tuned", "_mlp_bwd_tma_tuned")


@pytest.mark.parametrize("case, error, words", [
    ("int_x", TypeError, "x must have dtype"),
    ("list_x", TypeError, "x must be a torch.Tensor"),
    ("scalar_x", ValueError, "x must have at least 1"),
    ("fc_weight_shape", ValueError, "fc_weight must have shape (H, 32)"),
    ("fc_weight_rank", ValueError, "fc_weight must have shape"),
    ("proj_weight_shape", ValueError, "proj_weight must have shape (O, 48)"),
    ("fc_bias_shape", ValueError, "fc_bias must have shape (48,)"),
    ("proj_bias_shape", ValueError, "proj_bias must have shape (32,)"),
    ("fc_weight_dtype", TypeError, "fc_weight must have x's dtype"),
    ("proj_bias_dtype", TypeError, "proj_bias must have x's dtype"),
    ("int_proj_weight", TypeError, "proj_weight must have dtype"),
    ("proj_weight_device", ValueError, "proj_weight is on meta"),
    ("approximate", ValueError, "approximate must be one of"),
])
def test_bad_input(case, error, words, device, no_launch):
    x, w1, b1, w2, b2 = _inputs((4,), 32, 48, torch.float32, device)
    args, kwargs = {
        "int_x": ((x.long(), w1, b1, w2, b2), {}), "list_x": (([1.0], w1, b1, w2, b2), {}),
        "scalar_x": ((x[0, 0], w1, b1, w2, b2), {}), "fc_weight_shape": ((x, w1[:, :31], b1, w2, b2), {}),
        "fc_weight_rank": ((x, w1[0], b1, w2, b2), {}), "proj_weight_shape": ((x, w1, b1, w2[:, 1:], b2), {}),
        "fc_bias_shape": ((x, w1, b1[1:], w2, b2), {}), "proj_bias_shape": ((x, w1, b1, w2, b2[None]), {}),
        "fc_weight_dtype": ((x, w1.double(), b1, w2, b2), {}), "proj_bias_dtype": ((x, w1, b1, w2, b2.half()), {}),
        "int_proj_weight": ((x, w1, b1, w2.int(), b2), {}), "proj_weight_device": ((x, w1, b1, w2.to("meta"), b2), {}),
        "approximate": ((x, w1, b1, w2, b2), {"approximate": "erf"}),
    }[case]
    with pytest.raises(error) as info:
        gelu_mlp(*args, **kwargs)
    assert words in str(info.value)


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch, no_launch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Triton cannot run"):
        gelu_mlp(*_inputs((2,), 8, 16, torch.float32, "cpu"))


@pytest.mark.gpu
def test_gpt2_shape_bf16_on_gpu():
    """GPT-2 124M's MLP shape (16384 rows, C = 768, H = 3072): the autotuned, split-K GPU path."""
    inputs = _inputs((16384,), 768, 3072, torch.bfloat16, "cuda")
    _check_against_reference(inputs, _dy(inputs))


def test_autotune_pruning_fits_wide_dtypes_in_shared_memory():
    """The GPU lists are sized for 16-bit tiles; fp32 and fp64 keep fewer stages or drop configs."""
    configs = mlp_module._triton_configs(mlp_module.gpu_configs())

    def fitted(dtype):
        return mlp_module._fit_shared_memory(configs, {"A": torch.empty(0, dtype=dtype)})

    def smem(c, itemsize):
        return (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize * c.num_stages

    bf16 = fitted(torch.bfloat16)
    assert [(c.kwargs, c.num_stages) for c in bf16] == [(c.kwargs, c.num_stages) for c in configs]
    for dtype in (torch.float32, torch.float64):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        kept = fitted(dtype)
        assert kept and all(1 <= c.num_stages and smem(c, itemsize) <= mlp_module.SMEM_BUDGET for c in kept)
    assert len(fitted(torch.float64)) < len(configs)  # 128 x 256 x 64 fp64 does not fit even unpipelined
    assert mlp_module._fit_shared_memory(configs[:1], {"A": torch.empty(0, dtype=torch.float64)})[0].kwargs == \
        mlp_module._FALLBACK
