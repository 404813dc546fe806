"""Fused LayerNorm over the last dimension, forward and backward.

Forward: each program normalises a tile of BLOCK_M rows held whole in registers (one read of x, one
write of y): mean and variance in fp32, y = (x - mean) * rstd * w + b, the mean taken of the row
shifted by its first element so that a constant row gives exactly the bias. mean and rstd are saved
(fp32) only when a gradient will be needed. weight and bias are read through their strides (slices,
stride-0 expands).
Backward, two launches: a fixed grid of persistent programs walks contiguous chunks of rows (a
software-pipelined loop), writes dx for each row and its own fp32 partial sums of dw and db; one
small kernel sums the partials in a fixed order and casts them to the parameters' dtypes. No float
atomics, so repeated backward passes are bitwise equal.

Limits: C <= 16384 (a row must fit in one program's registers); fp16, bf16, fp32 and fp64 inputs
(fp64 computes in fp64, for gradcheck). Under torch.autocast the op is left alone: it already
computes in fp32 and returns x's dtype (CUDA autocast would run PyTorch's layer_norm in fp32 and
return fp32; CPU autocast keeps x's dtype, as here).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, acc_dtype, acc_torch_dtype, check_device, check_tensor, needs_grad,
                     num_programs_for, or_empty, real_number)

MAX_C = 16384


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, Mean, Rstd,
    stride_xm, stride_xc, stride_ym, stride_w, stride_b,
    M, C, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_STATS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < M
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride can pass 2**31

    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(ACC)
    # The mean of the row shifted by its first element x0: a constant row gives d = 0 and xc = 0
    # exactly, so y is exactly the bias (as PyTorch). Without the shift, mean's rounding error
    # survives in x - mean and is amplified by rstd, up to 1 / sqrt(eps), on near-zero variance.
    x0 = tl.load(X + rows64 * stride_xm, mask=row_mask, other=0.0).to(ACC)
    d = tl.where(mask, x - x0[:, None], 0.0)
    mean_d = tl.sum(d, axis=1) / C
    xc = tl.where(mask, d - mean_d[:, None], 0.0)
    mean = x0 + mean_d
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(ACC)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols * stride_b, mask=col_mask, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(Mean + rows, mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)


# With xhat = (x - mean) * rstd and g = dy * w (g = dy without weight), per row over its C features:
#   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
#   dw = sum over rows of dy * xhat,   db = sum over rows of dy
# Program p owns rows [p * ROWS_PER_PROG, (p + 1) * ROWS_PER_PROG) (at least one) and writes its
# column sums of dy * xhat and dy to the whole of row p of DWp and DBp (zeros included), so the
# partials need no zero-fill. The loop is software-pipelined (NUM_STAGES): the next tiles of x and
# dy are already loading while the current one is reduced, so a few programs per SM keep the
# memory busy.
@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DX, Mean, Rstd, DWp, DBp,
    stride_xm, stride_xc, stride_dym, stride_dyc, stride_dxm, stride_w,
    M, C, ROWS_PER_PROG,
    HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_W:
        w = tl.load(W + cols * stride_w, mask=col_mask, other=0.0).to(ACC)
    # per-thread running sums of the tile; summed over its rows once, after the loop (a sum over
    # rows inside the loop would cross warps, through shared memory, at every step)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    db_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    row_start = pid * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, M)
    for start in tl.range(row_start, row_end, BLOCK_M, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :] * stride_dyc, mask=mask, other=0.0)
        dy = dy.to(ACC)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x.to(ACC) - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DX:
            g = dy
            if HAS_W:
                g = dy * w[None, :]
            mean_g = tl.sum(g, axis=1) / C
            mean_gx = tl.sum(g * xhat, axis=1) / C
            dx = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
            tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(DWp + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if NEED_DB:
        tl.store(DBp + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# dw[c] = sum over p of DWp[p, c] (and db alike), p in increasing order within each lane of a
# BLOCK_P-row tile and then across the tile: a fixed order, so the sums are bitwise repeatable.
# The sums are cast to the parameters' dtypes on the way out. P = 0 (no rows) gives zeros.
@triton.jit
def _layer_norm_bwd_reduce_kernel(
    DWp, DBp, DW, DB, P, C,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < C
    dw = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        offsets = rows[:, None] * C + cols[None, :]
        if NEED_DW:
            dw += tl.load(DWp + offsets, mask=mask, other=0.0)
        if NEED_DB:
            db += tl.load(DBp + offsets, mask=mask, other=0.0)
    if NEED_DW:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    if NEED_DB:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


def _block_sizes(C):
    """Whole rows in registers; about 4096 elements per program, so small C gets several rows.

    Returns (BLOCK_M, BLOCK_C, num_warps); num_warps grows with the tile to keep about 16 fp32
    values per thread.
    """
    block_c = triton.next_power_of_2(C)
    block_m = max(1, min(16, 4096 // block_c))
    num_warps = min(16, max(4, block_m * block_c // 512))
    return block_m, block_c, num_warps


def _check_inputs(x, weight, bias, eps):
    check_tensor("x", x, min_ndim=1)
    C = x.shape[-1]
    if C == 0 or C > MAX_C:
        raise ValueError(f"x's last dimension (C) must be in [1, {MAX_C}], got {C}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p, dtypes=FLOAT_DTYPES)
        if tuple(p.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},) to match x's last dimension, got {tuple(p.shape)}")
    if not real_number("eps", eps) > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    check_device({"x": x, "weight": weight, "bias": bias})


def _stride(p):
    """A 1-D parameter's element stride (0 for an expanded one); 0 for an absent one (not read)."""
    return 0 if p is None else p.stride(0)


def _layer_norm_fwd(x, weight, bias, eps, store_stats):
    """Returns y (x's shape and dtype) and, when store_stats, mean and rstd (one per row, fp32).
    Inputs are already validated (by the public function)."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # a view whenever x's layout allows; the kernel takes both strides
    M = x2.shape[0]
    stat_dtype = acc_torch_dtype(x.dtype)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = rstd = None
    if store_stats:
        mean = torch.empty(M, dtype=stat_dtype, device=x.device)
        rstd = torch.empty(M, dtype=stat_dtype, device=x.device)
    if M > 0:
        block_m, block_c, num_warps = _block_sizes(C)
        _layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
            x2, weight, bias, y, mean, rstd,
            x2.stride(0), x2.stride(1), C, _stride(weight), _stride(bias),
            M, C, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=store_stats,
            ACC=acc_dtype(x.dtype), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
        )
    return y, mean, rstd


# The backward's row loop: tiles in flight per program (the software pipeline's depth), and the
# reduction's tile of partials (BLOCK_P programs x BLOCK_N columns per step).
BWD_STAGES = 2
REDUCE_BLOCK_P, REDUCE_BLOCK_N = 32, 64


def _bwd_programs(M, block_m, sms):
    """(programs, rows_per_prog) of the backward's persistent grid: two programs per SM (sms of
    them), each owning a whole, non-zero number of row tiles (so each writes its partials)."""
    tiles = triton.cdiv(M, block_m)
    programs = max(1, min(tiles, 2 * sms))
    rows_per_prog = triton.cdiv(tiles, programs) * block_m
    return (triton.cdiv(M, rows_per_prog) if M > 0 else 0), rows_per_prog


def _layer_norm_bwd(dy, x, weight, mean, rstd, need_dx, dw_dtype, db_dtype):
    """Returns (dx, dw, db) in x's dtype, dw_dtype and db_dtype; need_dx False or a dtype None
    skips that gradient and gives None. Two launches at most: the row kernel (dx and per-program
    partials of dw and db) and one reduction of the partials (dw and db summed and cast)."""
    need_dw, need_db = dw_dtype is not None, db_dtype is not None
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    dy2 = dy.reshape(-1, C)
    M = x2.shape[0]
    block_m, block_c, num_warps = _block_sizes(C)
    programs, rows_per_prog = _bwd_programs(M, block_m, num_programs_for(x.device))
    partial = acc_torch_dtype(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    # every program writes its whole row of partials: no zero-fill
    dw_part = torch.empty((programs, C), dtype=partial, device=x.device) if need_dw else None
    db_part = torch.empty((programs, C), dtype=partial, device=x.device) if need_db else None
    acc = acc_dtype(x.dtype)
    if M > 0:
        _layer_norm_bwd_kernel[(programs,)](
            x2, weight, dy2, dx, mean, rstd, dw_part, db_part,
            x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1), C, _stride(weight),
            M, C, rows_per_prog,
            HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
            ACC=acc, BLOCK_M=block_m, BLOCK_C=block_c, NUM_STAGES=BWD_STAGES, num_warps=num_warps,
        )
    dw = torch.empty(C, dtype=dw_dtype, device=x.device) if need_dw else None
    db = torch.empty(C, dtype=db_dtype, device=x.device) if need_db else None
    if need_dw or need_db:
        _layer_norm_bwd_reduce_kernel[(triton.cdiv(C, REDUCE_BLOCK_N),)](
            dw_part, db_part, dw, db, programs, C,
            NEED_DW=need_dw, NEED_DB=need_db, ACC=acc, BLOCK_P=REDUCE_BLOCK_P, BLOCK_N=REDUCE_BLOCK_N,
        )
    return dx, dw, db


# ---------------------------------------------------------------- custom ops and autograd
# torch.library custom ops, so torch.compile(fullgraph=True) traces through them as opaque calls.
# Their outputs cannot be None: a statistic or gradient that is not computed comes back as an
# empty tensor.

@torch.library.custom_op("tritongpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                       eps: float, store_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, mean, rstd = _layer_norm_fwd(x, weight, bias, eps, store_stats)
    return y, or_empty(mean, x, acc_torch_dtype(x.dtype)), or_empty(rstd, x, acc_torch_dtype(x.dtype))


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, store_stats):
    stats = x.new_empty(x.shape[:-1].numel() if store_stats else 0, dtype=acc_torch_dtype(x.dtype))
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), stats, torch.empty_like(stats)


@torch.library.custom_op("tritongpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                       rstd: torch.Tensor, need_dx: bool, dw_dtype: Optional[torch.dtype],
                       db_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd, need_dx, dw_dtype, db_dtype)
    return or_empty(dx, x, x.dtype), or_empty(dw, x, dw_dtype or x.dtype), or_empty(db, x, db_dtype or x.dtype)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, need_dx, dw_dtype, db_dtype):
    C = x.shape[-1]
    return (torch.empty(x.shape if need_dx else (0,), dtype=x.dtype, device=x.device),
            x.new_empty(C if dw_dtype else 0, dtype=dw_dtype or x.dtype),
            x.new_empty(C if db_dtype else 0, dtype=db_dtype or x.dtype))


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps, _store_stats = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    ctx.set_materialize_grads(False)  # mean and rstd get no gradient; do not build zeros for them


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # y's gradient is undefined (not materialised): so are the inputs'
        return None, None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    w_dtype, b_dtype = ctx.param_dtypes
    # dw and db are summed in fp32 (fp64 for fp64 x) and cast to the parameters' dtypes in the kernel
    dx, dw, db = _layer_norm_bwd_op(dy, x, weight, mean, rstd, need_dx, w_dtype if need_dw else None,
                                    b_dtype if need_db else None)
    return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None


_layer_norm_fwd_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension, fused in Triton: F.layer_norm(x, (C,), weight, bias, eps).

    x: (..., C) with C <= 16384, fp16/bf16/fp32/fp64, any strides (a view is read in place when
    its rows can be addressed with one stride, else reshaped to a copy first).
    weight, bias: (C,) or None, any float dtype. The output has x's shape and dtype; statistics
    and parameter-gradient sums are fp32. Differentiable in x, weight and bias (first order only);
    when none of them needs a gradient nothing is saved and mean/rstd are not written.
    A torch.library custom op (tritongpt::layer_norm_fwd/_bwd): torch.compile traces it whole.
    Differs from PyTorch under CUDA autocast only: the result keeps x's dtype instead of fp32.
    """
    _check_inputs(x, weight, bias, eps)
    return _layer_norm_fwd_op(x, weight, bias, real_number("eps", eps), needs_grad(x, weight, bias))[0]
