"""Property-based differential tests: every public op against kernels.reference in float64.

Hypothesis draws the cases: shapes with 1 and odd sizes, every dtype the interpreter computes
right, every layout of tests/helpers.LAYOUTS for every tensor argument (1-D parameters and targets
too), gradients on any subset of the inputs, and every option. Each case checks the 2x rule of
tests/helpers.py for the output and each requested gradient, that no input is modified, and that a
second backward pass is bitwise equal to the first.

Profiles (tests/conftest.py): "ci", the default, a small fixed budget with a derandomised seed;
"long" for local fuzzing: TRITONGPT_HYPOTHESIS=long python -m pytest tests/test_properties.py.

To cover a new option of an op, add a draw to its strategy below and pass it in `options`.
"""
import importlib
import math

import numpy as np
import pytest
import torch
import fa2
import fused_mlp
from helpers import LAYOUTS, assert_differential, dot_bound_slack, dtypes_for, viewer

from tritongpt.kernels import cross_entropy, flash_attention, gelu_mlp, layer_norm, linear_cross_entropy, reference

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given = hypothesis.given

ce_module = importlib.import_module("tritongpt.kernels.cross_entropy")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every kernel computes bf16 right in the interpreter (no tl.dot, or bf16 tiles upcast before it).
DTYPES = dtypes_for(DEVICE, bf16_in_interpreter=True)
SMALL = (1, 2, 3, 5)  # sizes of leading dimensions: 1 and odd sizes


# ---------------------------------------------------------------- small strategies

@st.composite
def tensor_arg(draw, shape, scale=1.0, shift=0.0):
    """(base, view): a float base of random values (seeded by hypothesis) and a view of `shape`
    over it in a drawn layout."""
    base_shape, view = viewer(draw(st.sampled_from(LAYOUTS)), shape)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(base_shape, generator=gen) * scale + shift
    return base.to(DEVICE), view


@st.composite
def optional_arg(draw, shape, scale=1.0, shift=0.0):
    """tensor_arg, or (None, None) for an absent optional tensor."""
    return draw(st.one_of(st.just((None, None)), tensor_arg(shape, scale, shift)))


@st.composite
def targets_arg(draw, N, V, ignore_index):
    """(base, view) of int64 targets in [0, V) with some rows set to ignore_index."""
    base_shape, view = viewer(draw(st.sampled_from(LAYOUTS)), (N,))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randint(0, V, base_shape, generator=gen)
    ignored = torch.rand(base_shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    base[ignored] = int(ignore_index)
    return base.to(DEVICE), view


def grads_for(n):
    """Which of n inputs require grad: any subset."""
    return st.lists(st.booleans(), min_size=n, max_size=n)


def seeded_dy():
    """The output gradient, a function of the output: random of its shape, the same every call."""
    return st.integers(0, 2**31 - 1).map(
        lambda seed: lambda out: torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device))


def shape_of(arg):
    """The shape of the view a (base, view) argument gives the op (None for an absent one)."""
    base, view = arg
    return None if base is None else tuple(view(base).shape)


def check(kernel, ref, case, names, dot_length=None, also=(), slacks=None):
    assert_differential(kernel, ref, case["args"], case["dtype"], case["dy"], case["grads"], names,
                        strict=True, dot_length=dot_length, also=also, slacks=slacks, **case["options"])


# ---------------------------------------------------------------- one strategy per op

@st.composite
def layer_norm_cases(draw):
    lead = draw(st.lists(st.sampled_from(SMALL), min_size=1, max_size=2))
    C = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 100]))
    args = [draw(tensor_arg((*lead, C), scale=draw(st.sampled_from([1.0, 30.0])), shift=0.5)),
            draw(optional_arg((C,), 0.5, 1.0)), draw(optional_arg((C,)))]
    options = dict(eps=draw(st.sampled_from([1e-5, 1e-12, 0.1, np.float32(1e-5)])))
    return dict(args=args, options=options, dtype=draw(st.sampled_from(DTYPES)), grads=draw(grads_for(3)),
                dy=draw(seeded_dy()))


@st.composite
def attention_cases(draw):
    B, H = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([16, 32]))
    causal = draw(st.booleans())
    # Tk >= 5: with one visible key PyTorch's dq is exactly 0 while FlashAttention's
    # dS = P * (dP - rowsum(dO * O)) keeps one rounding of dP (README, attention's limits)
    Tk = draw(st.sampled_from([5, 33]))
    # causal with Tq > Tk leaves queries that see no key: 0 here, nan in SDPA (tested apart)
    Tq = draw(st.sampled_from([t for t in (1, 3, 17, 40) if not causal or t <= Tk]))
    args = [draw(tensor_arg((B, H, Tq, D))), draw(tensor_arg((B, H, Tk, D))), draw(tensor_arg((B, H, Tk, D)))]
    options = dict(causal=causal, sm_scale=draw(st.sampled_from([None, 0.3, np.float32(0.125)])))
    return dict(args=args, options=options, dtype=draw(st.sampled_from(DTYPES)), grads=draw(grads_for(3)),
                dy=draw(seeded_dy()))


@st.composite
def mlp_cases(draw):
    lead = draw(st.lists(st.sampled_from(SMALL), min_size=1, max_size=2))
    C, H, O = (draw(st.sampled_from(sizes)) for sizes in ([0, 1, 7, 16], [1, 9, 33], [1, 5, 16]))
    args = [draw(tensor_arg((*lead, C))), draw(tensor_arg((H, C), scale=C**-0.5 if C else 1.0)),
            draw(optional_arg((H,), 0.1)), draw(tensor_arg((O, H), scale=H**-0.5)), draw(optional_arg((O,), 0.1))]
    options = dict(approximate=draw(st.sampled_from(["tanh", "none"])))
    return dict(args=args, options=options, dtype=draw(st.sampled_from(DTYPES)), grads=draw(grads_for(5)),
                dy=draw(seeded_dy()))


@st.composite
def ce_options(draw):
    return dict(ignore_index=draw(st.sampled_from([-100, 0, 3, np.int64(-1)])),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0, np.float32(0.25)])))


@st.composite
def cross_entropy_cases(draw):
    N, V = draw(st.sampled_from([1, 2, 5, 9])), draw(st.sampled_from([1, 2, 7, 33, 130]))
    options = draw(ce_options())
    args = [draw(tensor_arg((N, V), scale=3.0)), draw(targets_arg(N, V, options["ignore_index"]))]
    return dict(args=args, options=options, dtype=draw(st.sampled_from(DTYPES)),
                grads=[draw(st.booleans()), False], dy=draw(seeded_dy()))


@st.composite
def linear_cross_entropy_cases(draw):
    N, C, V = (draw(st.sampled_from(sizes)) for sizes in ([1, 2, 5, 9], [1, 3, 16], [1, 7, 33]))
    options = draw(ce_options())
    args = [draw(tensor_arg((N, C))), draw(tensor_arg((V, C), scale=C**-0.5)),
            draw(targets_arg(N, V, options["ignore_index"])), draw(optional_arg((V,)))]
    grads = draw(grads_for(4))
    grads[2] = False  # targets
    dtype, rows = draw(st.sampled_from(DTYPES)), draw(st.sampled_from([None, 1, 2]))
    return dict(args=args, options=options, dtype=dtype, grads=grads, dy=draw(seeded_dy()),
                chunk_bytes=None if rows is None else rows * V * dtype.itemsize)


# ---------------------------------------------------------------- the properties

def _layer_norm_slacks(case):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy * weight: a unit in the last place of
    those terms, eps * max rstd (|g| + mean|g| + |xhat| mean|g xhat|). Where they cancel (C = 2,
    where dx is 0 but for eps; a row of equal values) both the kernel and PyTorch return rounding
    noise: an fp32 draw, dx 1.2e-8 against 7.5e-9, oracle 3e-9 (relative RMS 4.7 against 2.1)."""
    dtype = case["dtype"]
    x, weight, _ = (None if base is None else view(base.to(dtype).double()) for base, view in case["args"])
    mean = x.mean(-1, keepdim=True)
    rstd = ((x - mean).pow(2).mean(-1, keepdim=True) + float(case["options"]["eps"])).rsqrt()
    xhat = (x - mean) * rstd
    dy = case["dy"](x).to(dtype).double()
    g = (dy * weight if weight is not None else dy).abs()
    terms = rstd * (g + g.mean(-1, keepdim=True) + xhat.abs() * (g * xhat.abs()).mean(-1, keepdim=True))
    return {"dx": torch.finfo(dtype).eps * (terms.max().item() if terms.numel() else 0.0)}


@given(layer_norm_cases())
def test_layer_norm(case):
    # fp32 statistics are sums over C, dweight and dbias sums over the rows (measured: a 3 x 3 fp32
    # draw, dweight 1.9 ulps from the oracle, PyTorch's 0.35)
    *lead, C = shape_of(case["args"][0])
    check(layer_norm, reference.layer_norm, case, ("y", "dx", "dweight", "dbias"), dot_length=max(C, math.prod(lead)),
          slacks=_layer_norm_slacks(case))


@given(attention_cases())
def test_flash_attention(case):
    # fp32 tiles are multiplied in fp32 (no tf32): dots over the head dim and over the queries or
    # keys (dK, dV; dQ), each rounded in fp32
    *_, Tq, D = shape_of(case["args"][0])
    # PyTorch's error: the worse of SDPA and FlashAttention-2's arithmetic in PyTorch (tests/fa2.py)
    check(flash_attention, reference.flash_attention, case, ("o", "dq", "dk", "dv"),
          dot_length=max(D, Tq, shape_of(case["args"][1])[-2]), also=(fa2.flash_attention,))


@given(mlp_cases())
def test_gelu_mlp(case):
    x, fc_weight, _, proj_weight, _ = (shape_of(arg) for arg in case["args"])
    rows = math.prod(x[:-1])  # the weight gradients sum over the rows
    # PyTorch's error: the worse of eager and the kernel's arithmetic in PyTorch (tests/fused_mlp.py)
    check(gelu_mlp, reference.gelu_mlp, case, ("y", "dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias"),
          dot_length=max(x[-1], fc_weight[0], proj_weight[0], rows), also=(fused_mlp.gelu_mlp,))


def _ce_slacks(case):
    """dlogits = s_i (p_ij - t_ij): where p_ij and t_ij nearly cancel (the target's p near 1) the
    result is the rounding of p, a unit in the last place of the terms (not of the small
    difference): eps * max |s_i| (p_ij + t_ij). Measured: fp32 logits [4.62, -0.88] with target 0,
    p = 0.996: the kernel 7.2e-8 off, PyTorch 2.1e-8, this slack 3.7e-7; a wrong p is off by far
    more than an ulp of it."""
    (logits, view), (targets, tview) = case["args"]
    terms = _softmax_terms(view(logits.to(case["dtype"]).double()), tview(targets), case)
    return {"dlogits": torch.finfo(case["dtype"]).eps * (terms.max().item() if terms.numel() else 0.0)}


@given(cross_entropy_cases())
def test_cross_entropy(case):
    check(cross_entropy, reference.cross_entropy, case, ("loss", "dlogits"), slacks=_ce_slacks(case))


def _linear_ce_slacks(case):
    """Slacks for dx = G @ W, dW = G^T x and db = column sums of G, G = dlogits: the first-order
    bounds of those products when G is rounded to the dtype (dot_bound_slack), with |G| bounded
    by its terms before they cancel, |s_i| (p_ij + t_ij) (s_i the row's upstream gradient, p the
    softmax, t the smoothed target). Where the exact result is 0 by cancellation (a stride-0
    weight: all rows alike, so G sums to 0 against them; label smoothing 1 with all logits equal:
    G = 0) the kernel and PyTorch both return only rounding noise, and whose is larger is chance
    (a bf16 draw: dx eager 2.1e-4, the kernel 4.8e-4, this bound 2.4e-3; an fp32 draw: db eager
    1.1e-8, the kernel 2.6e-8). A wrong G is off by the size of G, not by u times it."""
    x, weight, targets, bias = (None if base is None else view(base.to(case["dtype"]).double()
                                                                 if base.is_floating_point() else base)
                                for base, view in case["args"])
    terms = _softmax_terms(torch.nn.functional.linear(x, weight, bias), targets, case)
    dtype = case["dtype"]
    ones = torch.ones(terms.shape[0], 1, dtype=torch.float64)
    return {"dx": dot_bound_slack(terms, weight, dtype), "dweight": dot_bound_slack(terms.t(), x, dtype),
            "dbias": dot_bound_slack(terms.t(), ones, dtype)}


def _row_scales(targets, case):
    """(s, kept): each row's upstream gradient of the cross-entropy (dy for "none" and "sum", dy /
    kept rows for "mean"; dy rounded as the oracle sees it) and which rows are not ignored."""
    rows = torch.zeros(targets.shape[0], dtype=torch.float64, requires_grad=True)
    kept = targets != case["options"]["ignore_index"]
    total = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / kept.sum()}[case["options"]["reduction"]]
    (scale,) = torch.autograd.grad(total, rows, case["dy"](total).to(case["dtype"]).double())
    return scale, kept


def _softmax_terms(logits, targets, case):
    """|s_i| (p_ij + t_ij) on kept rows, 0 on ignored ones: what dlogits = s_i (p_ij - t_ij) is
    made of before p and t cancel."""
    scale, kept = _row_scales(targets, case)
    V = logits.shape[-1]
    smoothing = float(case["options"]["label_smoothing"])
    onehot = torch.nn.functional.one_hot(torch.where(kept, targets, 0), V).double()
    target_dist = (1 - smoothing) * onehot + smoothing / V
    return (scale.abs() * kept)[:, None] * (torch.softmax(logits.detach(), -1) + target_dist)


@given(linear_cross_entropy_cases())
def test_linear_cross_entropy(case):
    """Also with logits chunks of 1 or 2 rows (CHUNK_BYTES set for the case)."""
    saved = ce_module.CHUNK_BYTES
    ce_module.CHUNK_BYTES = case["chunk_bytes"] or saved
    try:
        N, C = shape_of(case["args"][0])
        check(linear_cross_entropy, reference.linear_cross_entropy, case,
              ("loss", "dx", "dweight", "dtargets", "dbias"), dot_length=max(N, C), slacks=_linear_ce_slacks(case))
    finally:
        ce_module.CHUNK_BYTES = saved
