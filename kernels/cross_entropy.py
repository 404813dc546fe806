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
place; then dx_c = g @ W, and dW += g.T @ x_c, db += sum(g) accumulate in fp32. For reduction
"mean"/"sum" all of this happens in the forward (the upstream gradient is then a scalar, applied
in the backward by one multiply). For "none" the upstream gradient is a per-row vector known only
in the backward: the forward saves x, the weights and the statistics, and the backward recomputes
each chunk's logits (one extra matmul).

Options follow F.cross_entropy: any ignore_index (such rows lose 0 and get a zero gradient),
reduction "mean" (sum over the kept rows / their count, counted on device: every row ignored
gives nan and a zero gradient, as PyTorch), "sum", "none"; label_smoothing eps in [0, 1]:
loss = (1 - eps) * (lse - x_target) + eps * (lse - mean(x)). The loss is fp32 (fp64 for fp64
logits, which compute in fp64, for gradcheck).

Target range policy: PyTorch raises on a target outside [0, V) that is not ignore_index. Checking
needs the targets on the host, so the check runs only where it costs no device sync: targets on
the CPU raise ValueError before any kernel runs. On CUDA the kernel never reads out of bounds:
such a row gets a nan loss and a nan gradient row, so the error shows instead of a silent wrong
answer (no host sync in forward or backward, as DESIGN.md asks).
Limits: logits (N, V) and x (N, C) 2-D, any strides; row and element offsets are int64.
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import acc_dtype, acc_torch_dtype, check_device, check_tensor, needs_grad

# Largest (rows x V) logits chunk linear_cross_entropy materialises, in bytes of x's dtype.
CHUNK_BYTES = 256 * 2**20
BLOCK_V_MAX = 4096
REDUCTIONS = ("mean", "sum", "none")


# With p = softmax(x), t the target and eps the label smoothing, a kept row's gradient is
#   d loss / d x_c = p_c - (1 - eps) * [c == t] - eps / V,
# scaled by the row's upstream gradient; ignored rows get 0, rows with a bad target nan.
@triton.jit
def _cross_entropy_grad_row(
    X, G, stride_xv, stride_gv, V, m, log_s, target, scale, valid, bad, smoothing,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row's gradient pass; X and G already point at the row (G may be X: same program)."""
    for start in range(0, V, BLOCK_V):
        cols = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask = cols < V
        x = tl.load(X + cols * stride_xv, mask=mask, other=0.0).to(ACC)
        p = tl.exp((x - m) - log_s)  # the softmax, rounded as PyTorch's
        g = p - smoothing / V - tl.where(cols == target, 1.0 - smoothing, 0.0)
        g = tl.where(valid, g * scale, 0.0)
        g = tl.where(bad, float("nan"), g)
        tl.store(G + cols * stride_gv, g.to(G.dtype.element_ty), mask=mask)


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
    V, ignore_index, smoothing,
    STORE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31
    X += row * stride_xm
    target, valid, bad = _target_state(T, row, stride_t, V, ignore_index)
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    x_sum = tl.zeros([], ACC)
    for start in range(0, V, BLOCK_V):
        cols = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask = cols < V
        x = tl.load(X + cols * stride_xv, mask=mask, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    log_s = tl.log(s)  # logsumexp = m + log_s, kept apart: x - m is exact where it matters
    x_t = tl.load(X + target * stride_xv, mask=valid & ~bad, other=0.0).to(ACC)
    loss = ((m - x_t) + log_s) * (1.0 - smoothing)  # as PyTorch: (1 - eps) * nll + eps * mean(-log p)
    if HAS_SMOOTHING:
        loss += smoothing * ((m - x_sum / V) + log_s)
    loss = tl.where(valid, loss, 0.0)
    tl.store(Loss + row, tl.where(bad, float("nan"), loss))
    if STORE_STATS:
        tl.store(Stats + 2 * row, m)
        tl.store(Stats + 2 * row + 1, log_s)
    if WRITE_GRAD:
        scale = tl.load(Scale + row * stride_s).to(ACC)
        _cross_entropy_grad_row(X, G + row * stride_gm, stride_xv, stride_gv, V, m, log_s, target,
                                scale, valid, bad, smoothing, ACC, BLOCK_V)


@triton.jit
def _cross_entropy_bwd_kernel(
    X, T, Stats, G, Scale,
    stride_xm, stride_xv, stride_t, stride_gm, stride_gv, stride_s,
    V, ignore_index, smoothing,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target, valid, bad = _target_state(T, row, stride_t, V, ignore_index)
    m = tl.load(Stats + 2 * row)
    log_s = tl.load(Stats + 2 * row + 1)
    scale = tl.load(Scale + row * stride_s).to(ACC)
    _cross_entropy_grad_row(X + row * stride_xm, G + row * stride_gm, stride_xv, stride_gv, V, m,
                            log_s, target, scale, valid, bad, smoothing, ACC, BLOCK_V)


def _block_v(V):
    """(BLOCK_V, num_warps): up to 4096 columns per step, about 16 fp32 values per thread."""
    block_v = min(BLOCK_V_MAX, triton.next_power_of_2(V))
    return block_v, max(1, min(8, block_v // 512))


# ---------------------------------------------------------------- input checks

def _check_options(targets, N, ignore_index, reduction, label_smoothing):
    check_tensor("targets", targets, dtypes=(torch.int64,))
    if tuple(targets.shape) != (N,):
        raise ValueError(f"targets must have shape ({N},), one per row, got {tuple(targets.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")


def _check_target_range(targets, V, ignore_index):
    """On CPU tensors (no device sync): ValueError for a target outside [0, V) that is not
    ignore_index. CUDA targets are checked in the kernel instead (nan loss), see the docstring."""
    if targets.device.type != "cpu":
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise ValueError(f"targets must be in [0, {V}) or equal ignore_index={ignore_index}; "
                         f"got {targets[bad][0].item()}")


def _check_ce_inputs(logits, targets, ignore_index, reduction, label_smoothing):
    check_tensor("logits", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, V) with V >= 1, got {tuple(logits.shape)}")
    _check_options(targets, logits.shape[0], ignore_index, reduction, label_smoothing)
    check_device({"logits": logits, "targets": targets})
    _check_target_range(targets, logits.shape[1], ignore_index)


def _check_linear_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing):
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
    _check_options(targets, x.shape[0], ignore_index, reduction, label_smoothing)
    check_device({"x": x, "weight": weight, "bias": bias, "targets": targets})
    _check_target_range(targets, V, ignore_index)


# ---------------------------------------------------------------- launchers

def _cross_entropy_fwd(logits, targets, ignore_index, smoothing, store_stats, grad=None, scale=None):
    """Per-row loss and, when store_stats, each row's softmax statistics (N, 2): the max m and
    log(sum(exp(x - m))), whose sum is the logsumexp. With grad (an (N, V) buffer, which may be
    logits itself when logits is ours) and scale (per-row factors, any stride), also writes
    scale * d loss_row / d logits into grad."""
    N, V = logits.shape
    loss = torch.empty(N, dtype=acc_torch_dtype(logits.dtype), device=logits.device)
    stats = torch.empty((N, 2), dtype=loss.dtype, device=logits.device) if store_stats else None
    if N > 0:
        block_v, num_warps = _block_v(V)
        write_grad = grad is not None
        _cross_entropy_fwd_kernel[(N,)](
            logits, targets, loss, stats, grad, scale,
            logits.stride(0), logits.stride(1), targets.stride(0),
            grad.stride(0) if write_grad else 0, grad.stride(1) if write_grad else 0,
            scale.stride(0) if write_grad else 0,
            V, ignore_index, float(smoothing),
            STORE_STATS=store_stats, WRITE_GRAD=write_grad, HAS_SMOOTHING=smoothing > 0,
            ACC=acc_dtype(logits.dtype), BLOCK_V=block_v, num_warps=num_warps,
        )
    return loss, stats


def _cross_entropy_bwd(logits, targets, stats, scale, ignore_index, smoothing, grad=None):
    """Writes scale[row] * d loss_row / d logits into grad (default: a new tensor shaped and typed
    like logits, contiguous) and returns it. scale: (N,) upstream gradient, any stride (0 too)."""
    N, V = logits.shape
    if grad is None:
        grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N > 0:
        block_v, num_warps = _block_v(V)
        _cross_entropy_bwd_kernel[(N,)](
            logits, targets, stats, grad, scale,
            logits.stride(0), logits.stride(1), targets.stride(0), grad.stride(0), grad.stride(1),
            scale.stride(0),
            V, ignore_index, float(smoothing),
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


def _linear_ce_chunks(x, weight, bias, targets, ignore_index, smoothing, need, scale=None, stats=None):
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
    dw = torch.zeros((V, C), dtype=acc, device=x.device) if need_dw else None
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
                logits, targets[part], ignore_index, smoothing, store_stats=True,
                grad=logits if write_grad else None, scale=scale[part] if write_grad else None)
        else:
            _cross_entropy_bwd(logits, targets[part], stats[part], scale[part], ignore_index, smoothing,
                               grad=logits)
        if need_dx:
            torch.mm(logits, weight, out=dx[part])
        if need_dw:
            if logits.dtype == acc:
                dw.addmm_(logits.t(), xc)
            else:  # fp16/bf16: each chunk's product from cuBLAS (fp32 inside), summed in fp32
                dw += logits.t() @ xc
        if need_db:
            db += logits.sum(0, dtype=acc)
    return loss, stats, dx, dw, db


# ---------------------------------------------------------------- autograd

class CrossEntropyFn(torch.autograd.Function):
    """Per-row losses of (N, V) logits; the reduction is left to torch ops outside."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing):
        loss, stats = _cross_entropy_fwd(logits, targets, ignore_index, label_smoothing, store_stats=True)
        ctx.save_for_backward(logits, targets, stats)
        ctx.options = (ignore_index, label_smoothing)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        logits, targets, stats = ctx.saved_tensors
        grad = _cross_entropy_bwd(logits, targets, stats, dloss, *ctx.options)
        return grad, None, None, None


class LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, targets, ignore_index, reduction, label_smoothing):
        need = ctx.needs_input_grad[:3]
        ctx.options = (ignore_index, label_smoothing)
        ctx.reduction = reduction
        if reduction == "none":  # gradients wait for the per-row upstream gradient
            loss, stats, *_ = _linear_ce_chunks(x, weight, bias, targets, ignore_index,
                                                label_smoothing, (False, False, False))
            ctx.save_for_backward(x, weight, bias, targets, stats)
            return loss
        acc = acc_torch_dtype(x.dtype)
        if reduction == "mean":
            count = (targets != ignore_index).sum()
            scale = (1.0 / count.to(acc)).expand(x.shape[0])  # inf when all ignored; those rows get 0
        else:
            scale = torch.ones((), dtype=acc, device=x.device).expand(x.shape[0])
        loss, _, dx, dw, db = _linear_ce_chunks(x, weight, bias, targets, ignore_index,
                                                label_smoothing, need, scale=scale)
        ctx.save_for_backward(dx, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss.sum() if reduction == "sum" else loss.sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        if ctx.reduction == "none":
            x, weight, bias, targets, stats = ctx.saved_tensors
            _, _, dx, dw, db = _linear_ce_chunks(x, weight, bias, targets, *ctx.options,
                                                 ctx.needs_input_grad[:3], scale=dloss, stats=stats)
            dtypes = (weight.dtype, None if bias is None else bias.dtype)
        else:
            dx, dw, db = ctx.saved_tensors
            # out of place: the saved gradients stay valid for a second backward (retain_graph)
            dx = None if dx is None else dx * dloss.to(dx.dtype)
            dw = None if dw is None else dw * dloss
            db = None if db is None else db * dloss
            dtypes = ctx.dtypes
        dw = None if dw is None else dw.to(dtypes[0])
        db = None if db is None else db.to(dtypes[1])
        return dx, dw, db, None, None, None, None


# ---------------------------------------------------------------- public functions

def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy in Triton: F.cross_entropy(logits.float(), targets, ...).

    logits: (N, V) fp16/bf16/fp32/fp64, any strides; never modified. targets: (N,) int64.
    ignore_index: rows whose target equals it add nothing (loss 0 with "none", gradient 0).
    reduction: "mean" (over the rows not ignored; nan when all are), "sum" or "none" (one loss
    per row). label_smoothing in [0, 1], PyTorch's semantics. Returns an fp32 loss (fp64 for fp64
    logits); the gradient has the logits' dtype and is recomputed in the backward from the saved
    softmax statistics. Differs from PyTorch: on CUDA a target outside [0, V) that is not ignore_index
    gives a nan loss instead of a device assert (CPU tensors raise ValueError, as PyTorch).
    """
    _check_ce_inputs(logits, targets, ignore_index, reduction, label_smoothing)
    if needs_grad(logits):
        loss = CrossEntropyFn.apply(logits, targets, ignore_index, label_smoothing)
    else:
        loss = _cross_entropy_fwd(logits, targets, ignore_index, label_smoothing, store_stats=False)[0]
    return _reduce(loss, targets, ignore_index, reduction)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0):
    """cross_entropy(x @ weight.T + bias, targets, ...) without materialising the (N, V) logits.

    x: (N, C); weight: (V, C) in nn.Linear layout (an lm_head tied to an embedding is fine); bias:
    (V,) or None; all three one float dtype (as F.linear needs); targets: (N,) int64. Options as
    cross_entropy. Rows go in chunks of at most CHUNK_BYTES of logits (module-level, 256 MiB).
    With "mean"/"sum" the gradients are computed during the forward (whenever x, weight or bias
    requires grad) and scaled in the backward; with "none" the backward recomputes the logits.
    Gradients come back in the inputs' dtypes; dW and db are summed over chunks in fp32.
    Under torch.autocast, x, weight and bias are cast to the autocast dtype first, as F.linear
    would cast them.
    """
    _check_linear_inputs(x, weight, targets, bias, ignore_index, reduction, label_smoothing)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # what F.linear would do: the matmuls in the low dtype
        low = torch.get_autocast_dtype(device_type)
        x, weight, bias = (None if t is None else t.to(low) for t in (x, weight, bias))
    with torch.autocast(device_type, enabled=False):  # our matmuls run in exactly x's dtype
        if needs_grad(x, weight, bias):
            return LinearCrossEntropyFn.apply(x, weight, bias, targets, ignore_index, reduction,
                                              label_smoothing)
        loss = _linear_ce_chunks(x, weight, bias, targets, ignore_index, label_smoothing,
                                 (False, False, False))[0]
        return _reduce(loss, targets, ignore_index, reduction)
