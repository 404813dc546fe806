"""tests/helpers.py's correctness rule itself: what it lets through and what it stops."""
import math

import pytest
import torch
from helpers import assert_close_2x, dot_bound_slack, dot_ulps


def test_a_failing_pytorch_is_no_bar():
    """Where PyTorch's own op returns nan and the oracle is finite, the bar is the oracle rounded
    to the dtype: a right kernel passes, a wrong one still fails."""
    oracle = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    pytorch = torch.tensor([float("nan")] * 3, dtype=torch.float16)
    assert_close_2x(oracle.half(), pytorch, oracle, "y")
    with pytest.raises(AssertionError, match="y"):
        assert_close_2x((oracle + 0.01).half(), pytorch, oracle, "y")


def test_dot_ulps_widen_only_fp32_accumulations():
    assert dot_ulps(torch.float32, 64) == 8.0
    assert dot_ulps(torch.float32, None) == dot_ulps(torch.float16, 64) == dot_ulps(torch.bfloat16, 64) == 1.0


def test_ulps_set_both_slacks():
    """A result off by three ulps of its largest value passes with ulps=4 and fails with one,
    when PyTorch is exact."""
    oracle = torch.tensor([1.0, 0.25], dtype=torch.float64)
    off = (oracle + torch.tensor([3 * torch.finfo(torch.float32).eps, 0.0], dtype=torch.float64)).float()
    assert_close_2x(off, oracle.float(), oracle, "x", ulps=4.0)
    with pytest.raises(AssertionError):
        assert_close_2x(off, oracle.float(), oracle, "x")
    assert math.isclose(dot_ulps(torch.float32, 16), 4.0)


def test_an_absolute_slack_covers_a_cancelled_result():
    """A result whose exact value is 0 (an oracle of 1e-18) is pure rounding noise: with the dot's
    error bound as slack a noise below it passes, though 2x PyTorch's smaller noise does not
    cover it, and an error above the bound still fails, in max-abs and relative RMS alike."""
    a = torch.tensor([[0.5, -0.25, -0.25]], dtype=torch.float64)  # rows of dlogits: sum 0
    b = torch.ones(3, 2, dtype=torch.float64)  # every row alike: a @ b = 0 exactly
    slack = dot_bound_slack(a, b, torch.bfloat16)
    assert slack == pytest.approx(torch.finfo(torch.bfloat16).eps / 2 * 1.0)
    oracle = torch.full((1, 2), 1e-18, dtype=torch.float64)
    pytorch = torch.full((1, 2), 1e-4).to(torch.bfloat16)
    noisy = torch.full((1, 2), 1e-3).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        assert_close_2x(noisy, pytorch, oracle, "dx")
    assert_close_2x(noisy, pytorch, oracle, "dx", slack=slack)
    with pytest.raises(AssertionError):
        assert_close_2x(noisy * 8, pytorch, oracle, "dx", slack=slack)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's cast (CPU runs)")
def test_the_suite_rounds_bf16_like_a_gpu():
    """conftest makes the interpreter's fp32 -> bf16 cast round to nearest even, as a GPU does
    (Triton's own interpreter truncates: checked here, so a fixed Triton shows up)."""
    import conftest
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Y + i, tl.load(X + i).to(tl.bfloat16).to(tl.float32))

    x = torch.cat([torch.randn(1021) * 3, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    y = torch.empty_like(x)
    cast[(1,)](x, y, N=1024)
    torch.testing.assert_close(y, x.to(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)
    from triton.runtime import interpreter
    truncated = conftest.INTERPRETER_CONVERT_FLOAT(x[:8].numpy(), tl.float32, tl.bfloat16, None)
    exact = np.ascontiguousarray(x[:8].to(torch.bfloat16).view(torch.int16).numpy()).view(np.uint16)
    assert interpreter._convert_float is not conftest.INTERPRETER_CONVERT_FLOAT
    assert not np.array_equal(np.asarray(truncated).view(np.uint16), exact), "Triton now rounds bf16 itself: drop the patch"


def _forward_backward(fn, inputs, dy, dtype, **kwargs):
    """[out] + every input's gradient, in float64, of fn on the inputs cast to dtype (fresh leaves)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    out.backward(dy.to(dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


@pytest.mark.parametrize("causal, Tq", [(True, 7), (True, 3), (False, 9)])
def test_fa2_baseline_is_attention(causal, Tq):
    """tests/fa2.py, a bar the property suite holds attention to, computes attention: exact in
    fp64, and in fp32 as close to the oracle as SDPA (a broken one would loosen the bar)."""
    import fa2

    from tritongpt.kernels import reference

    inputs = [torch.randn(2, 3, T, 16, dtype=torch.float64) for T in (Tq, 7, 7)]
    dy = torch.randn(2, 3, Tq, 16, dtype=torch.float64)

    def run(fn, dtype):
        return _forward_backward(fn, inputs, dy, dtype, causal=causal, sm_scale=0.3)

    oracle = run(reference.flash_attention, torch.float64)
    for got, want in zip(run(fa2.flash_attention, torch.float64), oracle):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for ours, sdpa, want in zip(run(fa2.flash_attention, torch.float32), run(reference.flash_attention, torch.float32),
                                oracle):
        assert (ours - want).abs().max() <= 4 * (sdpa - want).abs().max() + 1e-6


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_fused_mlp_baseline_is_the_mlp(approximate):
    """tests/fused_mlp.py, a bar the property suite holds gelu_mlp to, computes the MLP: exact in
    fp64, and in bf16 about as close to the oracle as eager (a broken one would loosen the bar)."""
    import fused_mlp

    from tritongpt.kernels import reference

    torch.manual_seed(0)
    inputs = [torch.randn(*s, dtype=torch.float64) / 4 for s in ((33, 16), (40, 16), (40,), (8, 40), (8,))]
    dy = torch.randn(33, 8, dtype=torch.float64)

    def run(fn, dtype):
        return _forward_backward(fn, inputs, dy, dtype, approximate=approximate)

    oracle = run(reference.gelu_mlp, torch.float64)
    for got, want in zip(run(fused_mlp.gelu_mlp, torch.float64), oracle):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for ours, eager, want in zip(run(fused_mlp.gelu_mlp, torch.bfloat16), run(reference.gelu_mlp, torch.bfloat16),
                                 oracle):
        assert (ours - want).abs().max() <= 4 * (eager - want).abs().max()


def test_leaf_keeps_the_layout_of_its_input():
    """Tests hand kernels sliced and transposed inputs through leaf: a dense copy would hide them."""
    from helpers import leaf

    base = torch.randn(6, 10)
    for view in (base[:, ::2], base.t(), base[1:, 2:7]):
        copy = leaf(view)
        assert copy.stride() == view.stride() and torch.equal(copy, view) and copy.is_leaf and copy.requires_grad
    expanded = torch.randn(1, 4).expand(3, 4)
    assert torch.equal(leaf(expanded), expanded) and leaf(expanded).is_contiguous()
