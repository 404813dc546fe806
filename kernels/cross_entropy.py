"""Softmax cross-entropy over the vocabulary, and the lm_head projection fused with it.

cross_entropy: one program per row walks the row in BLOCK_V-wide blocks (4096) with an online
softmax (running max and rescaled sum of exponentials, fp32), so a 50k-wide row never sits whole
in registers. The forward reads the logits once and writes per row an fp32 loss and the softmax
statistics m (the max) and log_s = log(sum(exp(x - m))), kept apart (logsumexp = m + log_s) so
that exp((x - m) - log_s) rounds as PyTorch's softmax. The backward recomputes the softmax from
them in one more read and writes the gradient into a fresh buffer in the logits' dtype; the
caller's logits are never written. Why recompute rather than write the gradient in the forward:
the caller's logits are alive anyway, so recomputing costs one read and no memory, while a
forward-written gradient would hold an (N, V) buffer from forward to backward and still need a
second pass to apply the upstream gradient. Peak memory is that one (N, V) gradient in the
logits' dtype (for bf16 a quarter of eager's fp32 upcast plus fp32 gradient, before eager's
log-softmax output), and the traffic three (N, V) passes.

linear_cross_entropy: the (N, V) logits never exist whole. Rows go in chunks of at most
CHUNK_BYTES of logits (256 MiB by default: at most 2670 rows at V = 50257 in bf16, split evenly,
so GPT-2's 16384 rows run as 7 chunks of 2341: big enough that the matmuls stay cuBLAS-efficient,
unlike 128-row chunks). Each chunk: logits = x_c @ W.T (+ b) by torch matmul, then the kernel
writes loss and statistics and turns the chunk's logits (our buffer) into their gradient g in
place; then dx_c = g @ W, and dW += g.T @ x_c, db += sum(g) accumulate in fp32. dW is one fp32
buffer that cuBLAS adds each chunk's product into in place (addmm's out_dtype; no (V, C)
temporary; the CPU, which lacks that op, upcasts the chunk's operands instead). For reduction
"mean"/"sum" all of this happens in the forward (the upstream gradient is then a scalar, folded in
the backward into the one cast of dW and db to the parameters' dtype). For "none" the upstream
gradient is a per-row vector known only in the backward: the forward saves x, the weights and
the statistics, and the backward recomputes each chunk's logits (one extra matmul).

Options follow F.cross_entropy: any ignore_index (such rows lose 0 and get a zero gradient),
reduction "mean" (sum over the kept rows / their count, counted on device: every row ignored
gives nan and a zero gradient, as PyTorch), "sum", "none"; label_smoothing eps in [0, 1]:
loss = (1 - eps) * (lse - x_target) + eps * (lse - mean(x)); z_loss z adds z * lse^2 per kept row
(PaLM); softcap c first maps the logits to c * tanh(x / c) (Gemma 2). The loss is fp32 (fp64 for fp64
logits, which compute in fp64, for gradcheck).

Target range policy: PyTorch raises on a target outside [0, V) that is not ignore_index. Checking
needs the targets on the host, so the check runs only where it costs no device sync: targets on
the CPU raise ValueError before any kernel runs. On CUDA the kernel never reads out of bounds:
such a row gets a nan loss and a nan gradient row, so the error shows instead of a silent wrong
answer (no host sync in forward or backward, as DESIGN.md asks).
Limits: logits (N, V) and x (N, C) 2-D, any strides; row and element offsets are int64.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, acc_torch_dtype, check_device, check_tensor, integer, needs_grad, or_empty, \
    real_number, tanh

# Largest (rows x V) logits chunk linear_cross_entropy materialises, in bytes of x's dtype.
CHUNK_BYTES = 256 * 2**20
BLOCK_V_MAX = 4096
REDUCTIONS = ("mean", "sum", "none")


# With y = softcap * tanh(x / softcap) (y = x without a cap), p = softmax(y), lse its
# logsumexp, t the target, eps the label smoothing and z the z-loss weight, a kept row's loss
# (1 - eps) (lse - y_t) + eps (lse - mean(y)) + z lse^2 has the gradient
#   d loss / d y_c = p_c (1 + 2 z lse) - (1 - eps) * [c == t] - eps / V,
#   d loss / d x_c = d loss / d y_c * (1 - tanh^2(x_c / softcap))   (with a cap),
# scaled by the row's upstream gradient; ignored rows get 0, rows with a bad target nan.
@triton.jit
def _capped(x, softcap, SOFTCAP: tl.constexpr):
    """(y, t): the logits after the cap, softcap * tanh(x / softcap), and t = that tanh (t unused
    without a cap, where y = x)."""
    if SOFTCAP:
        t = tanh(x / softcap)
        return softcap * t, t
    return x, x


@triton.jit
def _row_split(row, stride_xm, V, ALIGN: tl.constexpr, VEC: tl.constexpr):
    """(head, body, offset) of one row: with ALIGN (contiguous rows, 16-byte aligned base
    pointers), the first `head` < VEC elements run up to the row's first 16-byte boundary and the
    next `body` elements (a multiple of VEC = 16 bytes' worth) start on it, at element `offset` of
    the tensor (a multiple of VEC, hinted so: the body then loads and stores 128 bits at a time);
    the rest (< VEC) is the tail. Without ALIGN the whole row is the body."""
    if ALIGN:
        head = tl.minimum((VEC - (row * stride_xm) % VEC) % VEC, V)  # a short row may end first
        body = tl.multiple_of((V - head) // VEC * VEC, VEC)
        offset = tl.multiple_of(row * stride_xm + head, VEC)
    else:
        head = row * 0  # int64, like the aligned branch's
        body = V + head
        offset = row * stride_xm
    return head, body, offset


@triton.jit
def _edges(head, body, V, VEC: tl.constexpr):
    """Columns and mask of the head and tail of a split row as one 2 * VEC tile."""
    idx = tl.arange(0, 2 * VEC)
    cols = tl.where(idx < VEC, idx, head + body + idx - VEC).to(tl.int64)
    return cols, tl.where(idx < VEC, idx < head, cols < V)


@triton.jit
def _softmax_step(x, mask, m, s, x_sum, softcap, SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """One tile of the online softmax: the running max m, the sum s of exp(x - m), and (for label
    smoothing) the sum of x. x is -inf on masked columns; an all-masked tile changes nothing."""
    if SOFTCAP:  # padding columns stay -inf (the cap would make them -softcap)
        x = tl.where(mask, _capped(x, softcap, SOFTCAP)[0], float("-inf"))
    m_new = tl.maximum(m, tl.max(x, axis=0))
    seen = m_new != float("-inf")  # exp(-inf - -inf) would be nan
    s = tl.where(seen, s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0), s)
    if HAS_SMOOTHING:
        x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    return m_new, s, x_sum


@triton.jit
def _grad_tile(
    X, G, cols, mask, stride_xv, stride_gv, V, m, log_s, target, scale, valid, bad, smoothing, z_loss,
    softcap, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, ACC: tl.constexpr,
):
    """The gradient of one tile of a row: X and G point at column 0 of the tile's frame, target is
    the target's column in that frame."""
    y, t = _capped(tl.load(X + cols * stride_xv, mask=mask, other=0.0).to(ACC), softcap, SOFTCAP)
    p = tl.exp((y - m) - log_s)  # the softmax, rounded as PyTorch's
    if Z_LOSS:
        p = p * (1.0 + 2.0 * z_loss * (m + log_s))
    g = p - smoothing / V - tl.where(cols == target, 1.0 - smoothing, 0.0)
    if SOFTCAP:
        g = g * (1.0 - t * t)
    g = tl.where(valid, g * scale, 0.0)
    g = tl.where(bad, float("nan"), g)
    tl.store(G + cols * stride_gv, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_grad_row(
    X, G, row, stride_xm, stride_xv, stride_gm, stride_gv, V, m, log_s, target, scale, valid, bad,
    smoothing, z_loss, softcap,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row's gradient pass (G may be X: same program). With ALIGN the head and tail go as one
    small tile, then the 16-byte-aligned body in BLOCK_V tiles."""
    head, body, x_off = _row_split(row, stride_xm, V, ALIGN, VEC)
    g_off = row * stride_gm + head
    if ALIGN:  # the same head for G (see _alignment)
        g_off = tl.multiple_of(g_off, VEC)
        edge_cols, edge_mask = _edges(head, body, V, VEC)
        _grad_tile(X + row * stride_xm, G + row * stride_gm, edge_cols, edge_mask, stride_xv, stride_gv, V, m, log_s,
                   target, scale, valid, bad, smoothing, z_loss, softcap, SOFTCAP, Z_LOSS, ACC)
    for start in range(0, body, BLOCK_V):
        cols = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
        _grad_tile(X + x_off, G + g_off, cols, cols < body, stride_xv, stride_gv, V, m, log_s, target - head,
                   scale, valid, bad, smoothing, z_loss, softcap, SOFTCAP, Z_LOSS, ACC)


@triton.jit
def _target_state(T, row, stride_t, V, ignore_index):
    target = tl.load(T + row * stride_t)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= V))
    return target, valid, bad


@triton.jit
def _cross_entropy_fwd_kernel(
    X, T, Loss, Stats, G, Scale,
    stride_xm, stride_xv, stride_t, stride_gm, stride_gv, stride_s,
    V, ignore_index, smoothing: "fp64", z_loss: "fp64", softcap: "fp64",
    STORE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31
    # passed as fp64 (an fp32 argument would round them for fp64 logits), computed in ACC
    smoothing, z_loss, softcap = tl.full([], smoothing, ACC), tl.full([], z_loss, ACC), tl.full([], softcap, ACC)
    Xr = X + row * stride_xm
    target, valid, bad = _target_state(T, row, stride_t, V, ignore_index)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    x_sum = tl.zeros([], ACC)
    head, body, x_off = _row_split(row, stride_xm, V, ALIGN, VEC)
    for start in range(0, body, BLOCK_V):
        cols = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask = cols < body
        x = tl.load(X + x_off + cols * stride_xv, mask=mask, other=float("-inf")).to(ACC)
        m, s, x_sum = _softmax_step(x, mask, m, s, x_sum, softcap, SOFTCAP, HAS_SMOOTHING)
    if ALIGN:
        edge_cols, edge_mask = _edges(head, body, V, VEC)
        x = tl.load(Xr + edge_cols, mask=edge_mask, other=float("-inf")).to(ACC)
        m, s, x_sum = _softmax_step(x, edge_mask, m, s, x_sum, softcap, SOFTCAP, HAS_SMOOTHING)
    log_s = tl.log(s)  # logsumexp = m + log_s, kept apart: x - m is exact where it matters
    x_t = _capped(tl.load(Xr + target * stride_xv, mask=valid & ~bad, other=0.0).to(ACC), softcap, SOFTCAP)[0]
    loss = ((m - x_t) + log_s) * (1.0 - smoothing)  # as PyTorch: (1 - eps) * nll + eps * mean(-log p)
    if HAS_SMOOTHING:
        loss += smoothing * ((m - x_sum / V) + log_s)
    if Z_LOSS:
        loss += z_loss * (m + log_s) * (m + log_s)
    loss = tl.where(valid, loss, 0.0)
    tl.store(Loss + row, tl.where(bad, float("nan"), loss))
    if STORE_STATS:
        tl.store(Stats + 2 * row, m)
        tl.store(Stats + 2 * row + 1, log_s)
    if WRITE_GRAD:
        scale = tl.load(Scale + row * stride_s).to(ACC)
        _cross_entropy_grad_row(X, G, row, stride_xm, stride_xv, stride_gm, stride_gv, V, m, log_s, target,
                                scale, valid, bad, smoothing, z_loss, softcap, SOFTCAP, Z_LOSS, ALIGN, VEC,
                                ACC, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    X, T, Stats, G, Scale,
    stride_xm, stride_xv, stride_t, stride_gm, stride_gv, stride_s,
    V, ignore_index, smoothing: "fp64", z_loss: "fp64", softcap: "fp64",
    SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr, ALIGN: tl.constexpr, VEC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    smoothing, z_loss, softcap = tl.full([], smoothing, ACC), tl.full([], z_loss, ACC), tl.full([], softcap, ACC)
    target, valid, bad = _target_state(T, row, stride_t, V, ignore_index)
    m = tl.load(Stats + 2 * row)
    log_s = tl.load(Stats + 2 * row + 1)
    scale = tl.load(Scale + row * stride_s).to(ACC)
    _cross_entropy_grad_row(X, G, row, stride_xm, stride_xv, stride_gm, stride_gv, V, m, log_s, target,
                            scale, valid, bad, smoothing, z_loss, softcap, SOFTCAP, Z_LOSS, ALIGN, VEC,
                            ACC, BLOCK_V)


def _alignment(logits, grad=None):
    """Constexprs ALIGN and VEC (elements per 16 bytes): ALIGN when the rows are contiguous and
    both base pointers 16-byte aligned, and grad's rows (if any) sit at the same offsets modulo 16
    bytes as the logits' (then one head length per row serves both)."""
    vec = 16 // logits.element_size()
    tensors = (logits,) if grad is None else (logits, grad)
    align = (all(t.stride(1) == 1 and t.data_ptr() % 16 == 0 for t in tensors)
             and (grad is None or grad.stride(0) % vec == logits.stride(0) % vec))
    return dict(ALIGN=align, VEC=vec)


def _block_v(V):
    """(BLOCK_V, num_warps): up to 4096 columns per step, 32 values per thread: four 128-bit
    loads in flight per thread per step (bf16), and the body's wide accesses outnumber the row's
    scalar ones (target, statistics, head and tail) in the SASS. Against 16 values at 8 warps:
    on sm_90 more bytes in flight per SM (registers allow 28 resident warps in the forward, 48 in
    the backward: 57 and 98 KB, was 40 and 64), the same on sm_80, ~8% fewer instructions a value."""
    block_v = min(BLOCK_V_MAX, triton.next_power_of_2(V))
    return block_v, max(1, min(8, block_v // 1024))


# ---------------------------------------------------------------- input checks

def _check_options(targets, N, ignore_index, reduction, label_smoothing):
    """Returns (ignore_index, label_smoothing) as a Python int and float (NumPy scalars are
    accepted, as by F.cross_entropy)."""
    check_tensor("targets", targets, dtypes=(torch.int64,))
    if tuple(targets.shape) != (N,):
        raise ValueError(f"targets must have shape ({N},), one per row, got {tuple(targets.shape)}")
    ignore_index = integer("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= real_number("label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    return ignore_index, float(label_smoothing)


def _check_extras(z_loss, softcap):
    """z_loss: a finite number >= 0; softcap: None or a finite number > 0."""
    if not (math.isfinite(real_number("z_loss", z_loss)) and z_loss >= 0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    if softcap is not None:
        if not (math.isfinite(real_number("softcap", softcap)) and softcap > 0):
            raise ValueError(f"softcap must be finite and > 0, got {softcap}")


def _check_target_range(targets, V, ignore_index):
    """On CPU tensors (no device sync): ValueError for a target outside [0, V) that is not
    ignore_index. CUDA targets are checked in the kernel instead (nan loss), see the docstring.
    It reads the targets' values, so it runs inside the forward custom ops (before any launch),
    out of torch.compile's sight."""
    if targets.device.type != "cpu":
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"got {targets[bad][0].item()}")


def _check_ce_inputs(logits, targets, ignore_index, reduction, label_smoothing, z_loss, softcap):
    check_tensor("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, V) with V >= 1, got {tuple(logits.shape)}")
    options = _check_options(targets, logits.shape[0], ignore_index, reduction, label_smoothing)
    _check_extras(z_loss, softcap)
    check_device({"logits": logits, "targets": targets})
    return options


def _check_linear_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, softcap):
    check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, C), got {tuple(x.shape)}")
    check_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, {x.shape[1]}) with V >= 1 to match x's C, "
                         f"got {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape ({V},) to match weight, got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype} (as F.linear requires), got {t.dtype}")
    options = _check_options(targets, x.shape[0], ignore_index, reduction, label_smoothing)
    _check_extras(z_loss, softcap)
    check_device({"x": x, "weight": weight, "bias": bias, "targets": targets})
    return options


# ---------------------------------------------------------------- launchers

def _kernel_options(options):
    """(scalars, constexprs) of the kernels for options = (label_smoothing, z_loss, softcap)."""
    smoothing, z_loss, softcap = options
    scalars = (float(smoothing), float(z_loss), 1.0 if softcap is None else float(softcap))
    return scalars, dict(SOFTCAP=softcap is not None, Z_LOSS=z_loss != 0)


def _cross_entropy_fwd(logits, targets, ignore_index, options, store_stats, grad=None, scale=None):
    """Per-row loss and, when store_stats, each row's softmax statistics (N, 2): the max m and
    log(sum(exp(x - m))), whose sum is the logsumexp. With grad (an (N, V) buffer, which may be
    logits itself when logits is ours) and scale (per-row factors, any stride), also writes
    scale * d loss_row / d logits into grad."""
    N, V = logits.shape
    loss = torch.empty(N, dtype=acc_torch_dtype(logits.dtype), device=logits.device)
    stats = torch.empty((N, 2), dtype=loss.dtype, device=logits.device) if store_stats else None
    if N > 0:
        block_v, num_warps = _block_v(V)
        scalars, flags = _kernel_options(options)
        write_grad = grad is not None
        _cross_entropy_fwd_kernel[(N,)](
            logits, targets, loss, stats, grad, scale,
            logits.stride(0), logits.stride(1), targets.stride(0),
            grad.stride(0) if write_grad else 0, grad.stride(1) if write_grad else 0,
            scale.stride(0) if write_grad else 0,
            V, ignore_index, *scalars,
            STORE_STATS=store_stats, WRITE_GRAD=write_grad, HAS_SMOOTHING=options[0] > 0, **flags,
            **_alignment(logits, grad), ACC=acc_dtype(logits.dtype), BLOCK_V=block_v, num_warps=num_warps,
        )
    return loss, stats


def _cross_entropy_bwd(logits, targets, stats, scale, ignore_index, options, grad=None):
    """Writes scale[row] * d loss_row / d logits into grad (default: a new tensor shaped and typed
    like logits, contiguous) and returns it. scale: (N,) upstream gradient, any stride (0 too)."""
    N, V = logits.shape
    if grad is None:
        grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N > 0:
        block_v, num_warps = _block_v(V)
        scalars, flags = _kernel_options(options)
        _cross_entropy_bwd_kernel[(N,)](
            logits, targets, stats, grad, scale,
            logits.stride(0), logits.stride(1), targets.stride(0), grad.stride(0), grad.stride(1),
            scale.stride(0),
            V, ignore_index, *scalars, **flags, **_alignment(logits, grad),
            ACC=acc_dtype(logits.dtype), BLOCK_V=block_v, num_warps=num_warps,
        )
    return grad


def _reduce(loss, targets, ignore_index, reduction):
    """Per-row losses -> the requested reduction, with torch ops (differentiable, no host sync)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()  # 0 / 0 = nan when every row is ignored


def chunk_rows(N, V, itemsize, budget=None):
    """Rows per linear_cross_entropy chunk: at most `budget` (default CHUNK_BYTES) bytes of
    logits, the N rows split into equal chunks."""
    budget = CHUNK_BYTES if budget is None else budget
    max_rows = max(1, budget // (V * itemsize))
    return triton.cdiv(N, triton.cdiv(N, max_rows)) if N > 0 else 1


def _linear_ce_chunks(x, weight, bias, targets, ignore_index, options, need, scale=None, stats=None):
    """Walk x's rows in chunks: logits = x_c @ W.T (+ b), then the CE kernel.

    Forward (stats None): returns per-row loss and softmax statistics and, when any gradient is needed, the
    gradients for a per-row upstream `scale` (dx in x's dtype, dW and db in fp32).
    Backward (stats given): recomputes the logits, writes the gradients only; loss is None.
    need: (need_dx, need_dw, need_db).
    """
    N, C = x.shape
    V = weight.shape[0]
    need_dx, need_dw, need_db = need
    write_grad = any(need)
    acc = acc_torch_dtype(x.dtype)
    dx = torch.empty((N, C), dtype=x.dtype, device=x.device) if need_dx else None
    # the first chunk writes dw whole (no zero-fill), unless there is none
    dw = (torch.empty if N > 0 else torch.zeros)((V, C), dtype=acc, device=x.device) if need_dw else None
    db = torch.zeros(V, dtype=acc, device=x.device) if need_db else None
    forward = stats is None
    loss = torch.empty(N, dtype=acc, device=x.device) if forward else None
    stats = torch.empty((N, 2), dtype=acc, device=x.device) if forward else stats
    rows = chunk_rows(N, V, x.element_size())
    for start in range(0, N, rows):
        part = slice(start, min(start + rows, N))
        xc = x[part]
        logits = xc @ weight.t() if bias is None else torch.addmm(bias, xc, weight.t())
        if forward:
            loss[part], stats[part] = _cross_entropy_fwd(
                logits, targets[part], ignore_index, options, store_stats=True,
                grad=logits if write_grad else None, scale=scale[part] if write_grad else None)
        else:
            _cross_entropy_bwd(logits, targets[part], stats[part], scale[part], ignore_index, options,
                               grad=logits)
        if need_dx:
            torch.mm(logits, weight, out=dx[part])
        if need_dw:
            _accumulate(dw, logits.t(), xc, first=start == 0)
        if need_db:
            db += logits.sum(0, dtype=acc)
    return loss, stats, dx, dw, db


@functools.lru_cache(maxsize=None)
def _fp32_addmm_works(device):
    """Whether addmm can add a low-precision product into an fp32 tensor in place (out_dtype, CUDA
    only; older builds insist that the added tensor has the operands' dtype)."""
    try:
        a = torch.zeros((1, 1), dtype=torch.bfloat16, device=device)
        out = torch.zeros((1, 1), dtype=torch.float32, device=device)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _accumulate(dw, a, b, first):
    """dw = a @ b (first chunk) or dw += a @ b, accumulated in dw's fp32, with no (V, C) temporary:
    cuBLAS reads the fp16/bf16 operands, accumulates in fp32 and adds into dw (addmm's out_dtype).
    Where PyTorch lacks that (the CPU, older CUDA builds), the chunk's operands are upcast instead:
    fp32 copies of size (rows, V) and (rows, C), bounded by the chunk, never (V, C)."""
    if a.dtype != dw.dtype and not (dw.is_cuda and _fp32_addmm_works(dw.device)):
        a, b = a.to(dw.dtype), b.to(dw.dtype)
    if a.dtype == dw.dtype and first:
        torch.mm(a, b, out=dw)
    elif a.dtype == dw.dtype:
        dw.addmm_(a, b)
    elif first:
        torch.mm(a, b, out_dtype=dw.dtype, out=dw)
    else:
        torch.addmm(dw, a, b, out_dtype=dw.dtype, out=dw)


def _scaled(grad, dloss, dtype):
    """grad * dloss in `dtype`, one pass (read fp32, write dtype): the upstream gradient is folded
    into the cast. Out of place: the saved gradient stays valid for a second backward."""
    return torch.mul(grad, dloss, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


# ---------------------------------------------------------------- custom ops and autograd
# torch.library custom ops, so torch.compile(fullgraph=True) traces through them as opaque calls.
# Their outputs cannot be None: what is not computed comes back as an empty tensor.

@torch.library.custom_op("tritongpt::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, smoothing: float,
                          z_loss: float, softcap: Optional[float],
                          store_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses of (N, V) logits (the reduction is left to torch ops outside) and, when
    store_stats, the softmax statistics the backward needs."""
    _check_target_range(targets, logits.shape[1], ignore_index)
    loss, stats = _cross_entropy_fwd(logits, targets, ignore_index, (smoothing, z_loss, softcap), store_stats)
    return loss, or_empty(stats, logits, loss.dtype)


@_cross_entropy_fwd_op.register_fake
def _(logits, targets, ignore_index, smoothing, z_loss, softcap, store_stats):
    N = logits.shape[0]
    loss = logits.new_empty(N, dtype=acc_torch_dtype(logits.dtype))
    return loss, loss.new_empty((N, 2) if store_stats else (0,))


@torch.library.custom_op("tritongpt::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(dloss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor,
                          ignore_index: int, smoothing: float, z_loss: float,
                          softcap: Optional[float]) -> torch.Tensor:
    return _cross_entropy_bwd(logits, targets, stats, dloss, ignore_index, (smoothing, z_loss, softcap))


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, targets, stats, ignore_index, smoothing, z_loss, softcap):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, ignore_index, smoothing, z_loss, softcap, _store_stats = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.options = (ignore_index, smoothing, z_loss, softcap)
    ctx.set_materialize_grads(False)  # the statistics get no gradient; build no zeros for them


def _cross_entropy_backward(ctx, dloss, _dstats):
    if dloss is None:
        return (None,) * 7
    logits, targets, stats = ctx.saved_tensors
    return _cross_entropy_bwd_op(dloss, logits, targets, stats, *ctx.options), *(None,) * 6


_cross_entropy_fwd_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def _upstream_scale(targets, ignore_index, reduction, N, acc):
    """The gradient of the reduced loss with respect to each row's loss: 1 ("sum") or 1 / count
    ("mean"; inf when every row is ignored, whose gradients are 0 anyway), and the count."""
    if reduction == "mean":
        count = (targets != ignore_index).sum()
        return (1.0 / count.to(acc)).expand(N), count
    return torch.ones((), dtype=acc, device=targets.device).expand(N), None


@torch.library.custom_op("tritongpt::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      ignore_index: int, reduction: str, smoothing: float, z_loss: float,
                      softcap: Optional[float], need_dx: bool, need_dw: bool,
                      need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stats, dx, dw, db). With "none": per-row losses and the statistics the backward uses
    to recompute the logits. With "mean"/"sum": the reduced loss and the gradients for an upstream
    gradient of 1 (those not needed empty)."""
    _check_target_range(targets, weight.shape[0], ignore_index)
    acc = acc_torch_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):  # our matmuls run in exactly x's dtype
        if reduction == "none":  # gradients wait for the per-row upstream gradient
            loss, stats, *_ = _linear_ce_chunks(x, weight, bias, targets, ignore_index, (smoothing, z_loss, softcap),
                                                (False, False, False))
            return loss, stats, x.new_empty(0), x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
        scale, count = _upstream_scale(targets, ignore_index, reduction, x.shape[0], acc)
        loss, _, dx, dw, db = _linear_ce_chunks(x, weight, bias, targets, ignore_index, (smoothing, z_loss, softcap),
                                                (need_dx, need_dw, need_db), scale=scale)
    loss = loss.sum() if count is None else loss.sum() / count
    return loss, loss.new_empty(0), or_empty(dx, x, x.dtype), or_empty(dw, x, acc), or_empty(db, x, acc)


@_linear_ce_fwd_op.register_fake
def _(x, weight, bias, targets, ignore_index, reduction, smoothing, z_loss, softcap, need_dx, need_dw, need_db):
    (N, C), V = x.shape, weight.shape[0]
    acc = acc_torch_dtype(x.dtype)
    grads = reduction != "none"
    return (x.new_empty(N if reduction == "none" else (), dtype=acc),
            x.new_empty((N, 2) if reduction == "none" else (0,), dtype=acc),
            x.new_empty((N, C) if grads and need_dx else (0,)),
            x.new_empty((V, C) if grads and need_dw else (0,), dtype=acc),
            x.new_empty(V if grads and need_db else 0, dtype=acc))


@torch.library.custom_op("tritongpt::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd_op(dloss: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      targets: torch.Tensor, stats: torch.Tensor, ignore_index: int, smoothing: float,
                      z_loss: float, softcap: Optional[float], need_dx: bool, need_dw: bool,
                      need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction "none": recompute each chunk's logits and write the gradients for the per-row
    upstream gradient dloss (dw, db in fp32)."""
    acc = acc_torch_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        _, _, dx, dw, db = _linear_ce_chunks(x, weight, bias, targets, ignore_index, (smoothing, z_loss, softcap),
                                             (need_dx, need_dw, need_db), scale=dloss, stats=stats)
    return or_empty(dx, x, x.dtype), or_empty(dw, x, acc), or_empty(db, x, acc)


@_linear_ce_bwd_op.register_fake
def _(dloss, x, weight, bias, targets, stats, ignore_index, smoothing, z_loss, softcap, need_dx, need_dw, need_db):
    acc = acc_torch_dtype(x.dtype)
    return (x.new_empty(x.shape if need_dx else (0,)), x.new_empty(weight.shape if need_dw else (0,), dtype=acc),
            x.new_empty(weight.shape[0] if need_db else 0, dtype=acc))


def _linear_ce_setup(ctx, inputs, output):
    x, weight, bias, targets, ignore_index, reduction, smoothing, z_loss, softcap, *need = inputs
    _loss, stats, dx, dw, db = output
    ctx.reduction, ctx.options, ctx.need = reduction, (ignore_index, smoothing, z_loss, softcap), need
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, targets, stats)
    else:  # the gradients were computed in the forward; the backward only scales them
        ctx.save_for_backward(dx, dw, db)
    ctx.set_materialize_grads(False)


def _linear_ce_backward(ctx, dloss, *_unused):
    if dloss is None:
        return (None,) * 12
    need_dx, need_dw, need_db = ctx.need
    if ctx.reduction == "none":
        x, weight, bias, targets, stats = ctx.saved_tensors
        dx, dw, db = _linear_ce_bwd_op(dloss, x, weight, bias, targets, stats, *ctx.options, *ctx.need)
    else:
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients carry no graph
            raise RuntimeError("linear_cross_entropy does not support double backward (create_graph=True): "
                               "its gradients are computed in the forward, outside autograd; use "
                               "tritongpt.kernels.reference.linear_cross_entropy for higher-order gradients")
        dx, dw, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dx = dx * dloss.to(dx.dtype) if need_dx else None
        dw = _scaled(dw, dloss, w_dtype) if need_dw else None
        db = _scaled(db, dloss, b_dtype) if need_db else None
        return (dx, dw, db, *(None,) * 9)
    w_dtype, b_dtype = ctx.dtypes
    return (dx if need_dx else None, dw.to(w_dtype) if need_dw else None, db.to(b_dtype) if need_db else None,
            *(None,) * 9)


_linear_ce_fwd_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


# ---------------------------------------------------------------- public functions

def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None):
    """Softmax cross-entropy in Triton: F.cross_entropy(logits.float(), targets, ...).

    logits: (N, V) fp16/bf16/fp32/fp64, any strides; never modified. targets: (N,) int64.
    ignore_index: rows whose target equals it add nothing (loss 0 with "none", gradient 0).
    reduction: "mean" (over the rows not ignored; nan when all are), "sum" or "none" (one loss
    per row). label_smoothing in [0, 1], PyTorch's semantics. z_loss >= 0 adds
    z_loss * logsumexp(row)^2 to each kept row's loss (PaLM's auxiliary loss, reduced like the
    loss); softcap > 0 replaces the logits by softcap * tanh(logits / softcap) before the softmax
    (Gemma 2's final-logit cap), both with their gradients. Returns an fp32 loss (fp64 for fp64
    logits); the gradient has the logits' dtype and is recomputed in the backward from the saved
    softmax statistics. A torch.library custom op (tritongpt::cross_entropy_fwd/_bwd).
    Differs from PyTorch: on CUDA a target outside [0, V) that is not ignore_index gives a nan
    loss instead of a device assert (CPU tensors raise ValueError, as PyTorch).
    """
    ignore_index, label_smoothing = _check_ce_inputs(logits, targets, ignore_index, reduction, label_smoothing,
                                                     z_loss, softcap)
    z_loss, softcap = float(z_loss), None if softcap is None else float(softcap)
    loss = _cross_entropy_fwd_op(logits, targets, ignore_index, label_smoothing, z_loss, softcap,
                                 needs_grad(logits))[0]
    return _reduce(loss, targets, ignore_index, reduction)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None):
    """cross_entropy(x @ weight.T + bias, targets, ...) without materialising the (N, V) logits.

    x: (N, C); weight: (V, C) in nn.Linear layout (an lm_head tied to an embedding is fine); bias:
    (V,) or None; all three one float dtype (as F.linear needs); targets: (N,) int64. Options as
    cross_entropy (z_loss and softcap too). Rows go in chunks of at most CHUNK_BYTES of logits (module-level, 256 MiB).
    With "mean"/"sum" the gradients are computed during the forward (whenever x, weight or bias
    requires grad) and scaled in the backward; with "none" the backward recomputes the logits.
    Gradients come back in the inputs' dtypes; dW and db are summed over chunks in fp32.
    Under torch.autocast, x, weight and bias are cast to the autocast dtype first, as F.linear
    would cast them. A torch.library custom op (tritongpt::linear_cross_entropy_fwd/_bwd).
    """
    ignore_index, label_smoothing = _check_linear_inputs(x, weight, targets, bias, ignore_index, reduction,
                                                         label_smoothing, z_loss, softcap)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # what F.linear would do: the matmuls in the low dtype
        low = torch.get_autocast_dtype(device_type)
        x, weight, bias = (None if t is None else t.to(low) for t in (x, weight, bias))
    need = (needs_grad(x), needs_grad(weight), needs_grad(bias))
    return _linear_ce_fwd_op(x, weight, bias, targets, ignore_index, reduction, label_smoothing,
                             float(z_loss), None if softcap is None else float(softcap), *need)[0]
