"""Tiled FlashAttention, forward and backward: softmax(sm_scale * q @ k^T [+ causal mask]) @ v.

Forward: each program owns BLOCK_M queries of one (batch, head) and walks the keys in tiles of
BLOCK_N with an online softmax (running max m and sum l, fp32 accumulators), in base 2: scores are
multiplied by sm_scale * log2(e) inside the exponent's FMA, exp2(qk * c - m). Key tiles every query of the tile
sees run unmasked; only the tiles that cross the causal diagonal or the end of the keys are masked;
tiles past the diagonal are never visited. Per query row m (base 2) and 1/l are saved, in fp32.
On Hopper (and in the interpreter) fp16/bf16 key and value tiles come through TMA when their
layout allows it (_kv_descriptors); everything else reads them through pointers.
Backward, two launches: one kernel per query tile accumulates dQ over its key tiles and, from the
dO and O rows it holds anyway, writes delta = rowsum(dO * O); then one kernel per key tile
accumulates dK and dV over the query tiles that see it. Both recompute the probabilities from the
two statistics. Every gradient element is
written by exactly one program (no float atomics), so repeated backward passes are bitwise equal.

Semantics (== F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale) for Tq == Tk):
- q: (B, H, Tq, D), k and v: (B, H, Tk, D), any strides (the three views of a split fused qkv
  projection are read in place). With causal=True the mask is aligned to the end: query i sees the
  keys j <= i + Tk - Tq (a decoding step against a KV cache). Tq > Tk is allowed with the same
  rule: the first Tq - Tk queries then see no key.
- A query that sees no key gets an output of 0 and zero gradients (SDPA gives nan there).
- The output has q's dtype and is laid out as (B, Tq, H, D) memory viewed as (B, H, Tq, D), so the
  model's y.transpose(1, 2).contiguous() costs no copy; gradients come back in the same layout.
Limits: D in {16, 32, 64, 128}; fp16, bf16, fp32 (dots in full precision, no tf32) and fp64
(computed in fp64 throughout, for gradcheck); no dropout, no attention mask beyond causal; each
(batch, head) slice must be addressable with 32-bit offsets. In Triton's interpreter (CPU) bf16
tiles are upcast to fp32 before tl.dot, whose bf16 path is wrong there; on CUDA they go to the
tensor cores as bf16.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, acc_torch_dtype, check_device, check_tensor, has_tma, integer, interpreting, real_number, \
    tanh, tma_layout_ok

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = (16, 32, 64, 128)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (batch x heads here)
LOG2E = 1.4426950408889634

# Tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages) autotuned on CUDA, per kernel and head dim,
# pruned for H100 (wgmma wants 4 or 8 warps and M tiles of 64/128; 3 stages fit 228 KB of shared
# memory at these sizes). BLOCK_M counts queries, BLOCK_N keys. Every entry compiles for sm_90 with
# wgmma and without spills (checked ahead of time; configs that spilled were dropped). The first
# entry of each list is the expected winner at T = 1024 and the one kernels.inspect reports (it
# compiles without spills for sm_80 too).
CUDA_CONFIGS = {
    ("fwd", 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    ("fwd", 128): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    ("dkdv", 64): [(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
    ("dkdv", 128): [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)],
    ("dq", 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    ("dq", 128): [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
}
# The feature specialisations that carry more live state per tile (the softcap's tanh in the
# forward; GQA's loop over the group, the softcap or document ids in dK/dV; document ids in dQ,
# which also computes delta) pass 255 registers at the plain D = 64 tiles and take a stack frame on
# sm_80 or sm_90; these tiles compile with neither (checked ahead of time, tests/test_inspect.py).
# Window-only specialisations and the others in dQ fit the plain lists.
FEATURE_CONFIGS = {
    ("fwd", 64): [(128, 32, 8, 3), (64, 64, 4, 3)],
    ("dkdv", 64): [(32, 128, 8, 3)],
    ("dq", 64): [(128, 32, 8, 3)],
}
# Small head dims reuse the D = 64 lists (their tiles are smaller still). fp32 and fp64 dots run
# on CUDA cores (no tf32), which need far more registers per tile: small tiles only (correctness
# paths, not tuned for speed; some of these still spill a few hundred bytes at D = 128).
WIDE_CONFIGS = [(32, 32, 4, 2), (32, 32, 8, 2)]
# One fixed config in the interpreter (it runs programs one at a time, in numpy: fewer, larger
# tiles are faster), with BLOCK_M != BLOCK_N so the causal tile bookkeeping runs in its general form.
INTERPRET_CONFIG = {"fwd": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}


# ---------------------------------------------------------------- kernels

@triton.jit
def _dot(a, b, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a @ b with both operands rounded to the inputs' dtype, as the tensor cores take them. UPCAST
    (the interpreter on bf16) multiplies those rounded values in fp32 instead."""
    a = a.to(IN_DTYPE)
    b = b.to(IN_DTYPE)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _load_rows(P, rows, cols, stride_r, stride_c, n_rows, CHECK: tl.constexpr):
    """The tile P[rows, cols]; with CHECK, rows >= n_rows read 0 (without, all rows must exist)."""
    ptrs = P + rows[:, None] * stride_r + cols[None, :] * stride_c
    if CHECK:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_docs(Docs, offs, T):
    """Document ids of positions offs; a position past the end reads position T - 1's id (the
    tile that holds it holds T - 1 too, so the tile's min and max stay those of real positions)."""
    return tl.load(Docs + tl.minimum(offs, T - 1))


@triton.jit
def _share_docs(qdoc, kdoc):
    """Whether a query tile and a key tile may share a document: their id ranges overlap. Exact
    for any ids (no overlap means no equal pair); selective when ids grow along T (packing)."""
    return (tl.min(kdoc, 0) <= tl.max(qdoc, 0)) & (tl.max(kdoc, 0) >= tl.min(qdoc, 0))


@triton.jit
def _scores(qk, qk_scale, cap, SOFTCAP: tl.constexpr):
    """(x, c, t): the base-2 scores are x * c, left unscaled so the scale folds into the
    exponent's FMA, exp2(x * c - m); t is for the softcap's derivative. The launcher makes c > 0
    (so a masked x = -inf stays -inf and max(x) * c is the max of the scores).
    Plain: x = qk, c = qk_scale = sm_scale * log2(e) (t unused).
    SOFTCAP: x = cap * t, c = 1, t = tanh(qk * qk_scale), with qk_scale = sm_scale / softcap and
    cap = softcap * log2(e): softcap * tanh(sm_scale * qk / softcap) in base 2."""
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        return cap * t, 1.0, t
    return qk, qk_scale, qk


@triton.jit
def _visible(rows, cols, Tq, Tk, window, qdoc, kdoc,
             CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Whether query `rows` sees key `cols` (broadcast index tensors; qdoc and kdoc their document
    ids, broadcast alike): the key exists; when causal j <= i + Tk - Tq (the mask aligned to the end);
    with a window also j > i + Tk - Tq - window; with documents the same document."""
    keep = cols < Tk
    if CAUSAL:
        keep = keep & (cols <= rows + (Tk - Tq))
    if HAS_WINDOW:
        keep = keep & (cols > rows + (Tk - Tq) - window)
    if HAS_DOCS:
        keep = keep & (qdoc == kdoc)
    return keep


@triton.jit
def _key_range(m0, Tq, Tk, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the queries [m0, m0 + BLOCK_M): (lo, mid_lo, mid_hi, hi). Key tiles in [mid_lo, mid_hi)
    are seen whole by every query (no mask); tiles in [lo, mid_lo) and [mid_hi, hi) need the mask;
    keys before lo and from hi on are seen by none (never loaded). Query i sees keys
    j < min(Tk, i + Tk - Tq + 1) when causal and j > i + Tk - Tq - window with a window.
    With documents every tile is masked (which keys a query sees depends on the ids)."""
    off = Tk - Tq
    if CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + off, 0), Tk)
        full_hi = tl.minimum(tl.maximum(m0 + off + 1, 0), Tk)
    else:
        hi = Tk
        full_hi = Tk
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:  # the first query's first key, and the first key inside every query's window
        lo = tl.minimum((tl.maximum(m0 + off - window + 1, 0) // BLOCK_N) * BLOCK_N, hi)
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M + off - window, 0), BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    else:
        lo = 0
        mid_lo = 0
    if HAS_DOCS:
        mid_hi = mid_lo
    else:
        mid_hi = tl.maximum(full_hi, mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _load_kv(K, V, Kd, Vd, kb, kh, start_n, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, Tk,
             MASKED: tl.constexpr, TMA: tl.constexpr):
    """The key and value tiles of rows offs_n = start_n + arange(BLOCK_N). TMA: through the
    (B, H_kv, Tk, D) tensor descriptors Kd, Vd at batch kb, kv head kh (the copy engine fills
    rows past Tk with zeros, as the masked pointer load does); else rows of pointers."""
    if TMA:
        k = Kd.load([kb, kh, start_n, 0]).reshape([offs_n.shape[0], offs_d.shape[0]])
        v = Vd.load([kb, kh, start_n, 0]).reshape([offs_n.shape[0], offs_d.shape[0]])
    else:
        k = _load_rows(K, offs_n, offs_d, stride_kn, stride_kd, Tk, MASKED)
        v = _load_rows(V, offs_n, offs_d, stride_vn, stride_vd, Tk, MASKED)
    return k, v


@triton.jit
def _attention_fwd_tile(
    acc, l_i, m_i, q, K, V, Kd, Vd, kb, kh, start_n, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n,
    offs_d, qdoc, kdoc, Tq, Tk, qk_scale, cap, window,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DOCS: tl.constexpr, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr,
):
    """Fold the key tile offs_n into the running (acc, l, m); MASKED applies the mask."""
    k, v = _load_kv(K, V, Kd, Vd, kb, kh, start_n, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd, Tk,
                    MASKED, TMA)
    x, c, _t = _scores(_dot(q, tl.trans(k), IN_DTYPE, UPCAST, PREC), qk_scale, cap, SOFTCAP)
    if MASKED:
        keep = _visible(offs_m[:, None], offs_n[None, :], Tq, Tk, window, qdoc[:, None], kdoc[None, :],
                        CAUSAL, HAS_WINDOW, HAS_DOCS)
        x = tl.where(keep, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1) * c)
    if MASKED:  # a row with no visible key so far keeps m = -inf: subtract 0 instead (p = 0)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(x * c - m_use[:, None])  # one FMA, one rounding, then exp2
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p, v, IN_DTYPE, UPCAST, PREC)
    return acc, l_i, m_new


@triton.jit
def _attention_fwd_tiles(
    acc, l_i, m_i, q, K, V, Kd, Vd, kb, kh, Docs, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, qdoc,
    lo, hi, Tq, Tk, qk_scale, cap, window,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DOCS: tl.constexpr, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    TMA: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fold the key tiles [lo, hi) into the running (acc, l, m); with documents, tiles that share
    no document with the query tile are skipped."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)
        if HAS_DOCS:
            kdoc = _load_docs(Docs, offs_n, Tk)
            if _share_docs(qdoc, kdoc):
                acc, l_i, m_i = _attention_fwd_tile(
                    acc, l_i, m_i, q, K, V, Kd, Vd, kb, kh, start_n, stride_kn, stride_kd, stride_vn, stride_vd,
                    offs_m, offs_n, offs_d, qdoc, kdoc, Tq, Tk, qk_scale, cap, window,
                    MASKED, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, TMA)
        else:
            acc, l_i, m_i = _attention_fwd_tile(
                acc, l_i, m_i, q, K, V, Kd, Vd, kb, kh, start_n, stride_kn, stride_kd, stride_vn, stride_vd,
                offs_m, offs_n, offs_d, qdoc, offs_n, Tq, Tk, qk_scale, cap, window,
                MASKED, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, TMA)
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, Stats, Docs, Kd, Vd,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_docb, H, GROUP, Tq, Tk, qk_scale, cap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DOCS: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch, query head); query head h reads kv head h // GROUP.
    TMA: keys and values come through the tensor descriptors Kd, Vd (else K, V and strides)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # (b, h) offsets can pass 2**31; within a head they cannot
    b = bh // H
    h = bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    O += b * stride_ob + h * stride_oh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < Tq
    q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, Tq, True)
    IN_DTYPE: tl.constexpr = Q.dtype.element_ty
    if HAS_DOCS:
        Docs += b * stride_docb
        qdoc = _load_docs(Docs, offs_m, Tq)
    else:
        qdoc = offs_m  # unused

    acc = tl.zeros((BLOCK_M, HEAD_D), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    lo, mid_lo, mid_hi, hi = _key_range(m0, Tq, Tk, window, CAUSAL, HAS_WINDOW, HAS_DOCS, BLOCK_M, BLOCK_N)
    kb, kh = b.to(tl.int32), (h // GROUP).to(tl.int32)  # the descriptors' batch and kv-head coordinates
    acc, l_i, m_i = _attention_fwd_tiles(
        acc, l_i, m_i, q, K, V, Kd, Vd, kb, kh, Docs, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, qdoc,
        lo, mid_lo, Tq, Tk, qk_scale, cap, window,
        True, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, TMA, BLOCK_N)
    acc, l_i, m_i = _attention_fwd_tiles(
        acc, l_i, m_i, q, K, V, Kd, Vd, kb, kh, Docs, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, qdoc,
        mid_lo, mid_hi, Tq, Tk, qk_scale, cap, window,
        False, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, TMA, BLOCK_N)
    acc, l_i, m_i = _attention_fwd_tiles(
        acc, l_i, m_i, q, K, V, Kd, Vd, kb, kh, Docs, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, qdoc,
        mid_hi, hi, Tq, Tk, qk_scale, cap, window,
        True, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, TMA, BLOCK_N)

    # The softmax statistics m (base 2) and 1/l are saved apart, not as one logsumexp
    # m + log2(l): rounding that sum to fp32 costs half an ulp of m, a relative error of up to
    # ulp(m) in every probability the backward rebuilds (16x fp32's eps at m ~ 30, what a peaked
    # softmax reaches), where exp2(x * c - m) * (1 / l) costs one ulp of the small x * c - m.
    # A row that saw no key has l = 0: output 0, and m = +inf so the backward's p is 0 for it.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    Stats += bh * 2 * Tq + offs_m
    tl.store(Stats, tl.where(empty, float("inf"), m_i), mask=row_ok)
    tl.store(Stats + Tq, 1.0 / l_safe, mask=row_ok)


# With S = sm_scale * Q K^T, optionally capped (C = softcap * tanh(S / softcap), masked entries
# -inf), P = softmax(C) row-wise, O = P V, dO the output gradient and delta_i = rowsum(dO * O)_i
# (which equals rowsum(P * dP)_i):
#   dV = P^T dO,   dP = dO V^T,   dC = P * (dP - delta),   dS = dC * (1 - tanh^2(S / softcap))
#   (dS = dC without a cap),   dQ = sm_scale * dS K,   dK = sm_scale * dS^T Q
# P is recomputed as exp2(C * log2(e) - m) * (1 / l) from the forward's row statistics (m = +inf
# for padding rows and rows that see no key, which makes their P exactly 0). With GQA a kv head's dK
# and dV sum this over the query heads of its group, in one program, in a fixed order.
@triton.jit
def _load_per_row(X, offs_m, Tq, other, CHECK: tl.constexpr):
    """X[offs_m]; with CHECK, queries past Tq read `other`."""
    if CHECK:
        return tl.load(X + offs_m, mask=offs_m < Tq, other=other)
    return tl.load(X + offs_m)


@triton.jit
def _load_stats(Stats, offs_m, Tq, CHECK: tl.constexpr):
    """(m, 1/l) of the queries offs_m (Stats: one head's [m; 1/l] rows of Tq); with CHECK, queries
    past Tq read m = +inf, which makes their probabilities 0."""
    return _load_per_row(Stats, offs_m, Tq, float("inf"), CHECK), _load_per_row(Stats + Tq, offs_m, Tq, 0.0, CHECK)


@triton.jit
def _query_range(n0, Tq, Tk, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the keys [n0, n0 + BLOCK_N): (lo, mid_lo, mid_hi, hi). Query tiles in [mid_lo, mid_hi)
    see all of these keys (no mask); tiles in [lo, mid_lo) and [mid_hi, hi) see some (mask);
    queries before lo and from hi on see none. [mid_hi, hi) may hold a last partial tile unmasked
    is fine there: its padding rows have m = +inf."""
    off = Tk - Tq
    if CAUSAL:
        first = tl.minimum(tl.maximum(n0 - off, 0), Tq)  # the first query that sees key n0
        full = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - off, 0), Tq)  # ... that sees the whole tile
        lo = (first // BLOCK_M) * BLOCK_M
        mid_lo = tl.cdiv(full, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid_lo = 0
    if HAS_WINDOW:  # query i sees key j only while i <= j - off + window - 1
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - off + window, 0), Tq)
        full_hi = (tl.minimum(tl.maximum(n0 - off + window, 0), Tq) // BLOCK_M) * BLOCK_M
        mid_lo = tl.minimum(mid_lo, hi)
        mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    else:
        hi = Tq
        mid_hi = Tq
    if HAS_DOCS:
        mid_hi = mid_lo
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _attention_bwd_dkdv_tile(
    dk, dv, k, v, Q, DO, Stats, Delta, stride_qm, stride_qd, stride_dom, stride_dod, offs_m, offs_n,
    offs_d, qdoc, kdoc, Tq, Tk, qk_scale, cap, window,
    MASKED: tl.constexpr, EVEN_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_DOCS: tl.constexpr, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Add one query tile's share to dK and dV of one key tile, working transposed (keys x queries)
    so no probability tile is ever transposed."""
    # Only the last tile may pass Tq (its padding rows add exactly 0): bounds-checked loads
    # on the masked tiles and when Tq is not a multiple of the tile.
    q = _load_rows(Q, offs_m, offs_d, stride_qm, stride_qd, Tq, MASKED or not EVEN_M)
    do = _load_rows(DO, offs_m, offs_d, stride_dom, stride_dod, Tq, MASKED or not EVEN_M)
    m, rl = _load_stats(Stats, offs_m, Tq, MASKED or not EVEN_M)
    delta = _load_per_row(Delta, offs_m, Tq, 0.0, MASKED or not EVEN_M)
    x_t, c, t_t = _scores(_dot(k, tl.trans(q), IN_DTYPE, UPCAST, PREC), qk_scale, cap, SOFTCAP)
    p_t = tl.math.exp2(x_t * c - m[None, :]) * rl[None, :]
    if MASKED:
        keep = _visible(offs_m[None, :], offs_n[:, None], Tq, Tk, window, qdoc[None, :], kdoc[:, None],
                        CAUSAL, HAS_WINDOW, HAS_DOCS)
        p_t = tl.where(keep, p_t, 0.0)
    dv += _dot(p_t, do, IN_DTYPE, UPCAST, PREC)
    dp_t = _dot(v, tl.trans(do), IN_DTYPE, UPCAST, PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * (1.0 - t_t * t_t)
    dk += _dot(ds_t, q, IN_DTYPE, UPCAST, PREC)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_tiles(
    dk, dv, k, v, Q, DO, Stats, Delta, Docs, stride_qm, stride_qd, stride_dom, stride_dod, offs_n,
    offs_d, kdoc, lo, hi, Tq, Tk, qk_scale, cap, window,
    MASKED: tl.constexpr, EVEN_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_DOCS: tl.constexpr, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Accumulate dK and dV of one key tile over the query tiles [lo, hi) of one query head; with
    documents, query tiles that share no document with the key tile are skipped."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = tl.multiple_of(start_m, BLOCK_M) + tl.arange(0, BLOCK_M)
        if HAS_DOCS:
            qdoc = _load_docs(Docs, offs_m, Tq)
            if _share_docs(qdoc, kdoc):
                dk, dv = _attention_bwd_dkdv_tile(
                    dk, dv, k, v, Q, DO, Stats, Delta, stride_qm, stride_qd, stride_dom, stride_dod, offs_m,
                    offs_n, offs_d, qdoc, kdoc, Tq, Tk, qk_scale, cap, window,
                    MASKED, EVEN_M, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC)
        else:
            dk, dv = _attention_bwd_dkdv_tile(
                dk, dv, k, v, Q, DO, Stats, Delta, stride_qm, stride_qd, stride_dom, stride_dod, offs_m,
                offs_n, offs_d, offs_m, kdoc, Tq, Tk, qk_scale, cap, window,
                MASKED, EVEN_M, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, Stats, Delta, DK, DV, Docs,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_docb, H, GROUP, Tq, Tk, qk_scale, sm_scale, cap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DOCS: tl.constexpr,
    EVEN_M: tl.constexpr, HEAD_D: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key tile, batch, kv head): dK and dV of BLOCK_N keys, summed over the GROUP
    query heads that read this kv head (one after the other: deterministic, no atomics).
    DK and DV share strides."""
    n0 = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    H_KV = H // GROUP
    b = bhk // H_KV
    hk = bhk % H_KV
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    key_ok = offs_n[:, None] < Tk
    k = _load_rows(K, offs_n, offs_d, stride_kn, stride_kd, Tk, True)
    v = _load_rows(V, offs_n, offs_d, stride_vn, stride_vd, Tk, True)
    IN_DTYPE: tl.constexpr = Q.dtype.element_ty
    if HAS_DOCS:
        Docs += b * stride_docb
        kdoc = _load_docs(Docs, offs_n, Tk)
    else:
        kdoc = offs_n  # unused

    dk = tl.zeros((BLOCK_N, HEAD_D), dtype=ACC)
    dv = tl.zeros((BLOCK_N, HEAD_D), dtype=ACC)
    lo, mid_lo, mid_hi, hi = _query_range(n0, Tq, Tk, window, CAUSAL, HAS_WINDOW, HAS_DOCS, BLOCK_M, BLOCK_N)
    for g in range(GROUP):
        h = hk * GROUP + g
        Qh = Q + b * stride_qb + h * stride_qh
        DOh = DO + b * stride_dob + h * stride_doh
        Stats_h = Stats + (b * H + h) * 2 * Tq
        Delta_h = Delta + (b * H + h) * Tq
        dk, dv = _attention_bwd_dkdv_tiles(
            dk, dv, k, v, Qh, DOh, Stats_h, Delta_h, Docs, stride_qm, stride_qd, stride_dom, stride_dod,
            offs_n, offs_d, kdoc, lo, mid_lo, Tq, Tk, qk_scale, cap, window,
            True, EVEN_M, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, BLOCK_M)
        dk, dv = _attention_bwd_dkdv_tiles(
            dk, dv, k, v, Qh, DOh, Stats_h, Delta_h, Docs, stride_qm, stride_qd, stride_dom, stride_dod,
            offs_n, offs_d, kdoc, mid_lo, mid_hi, Tq, Tk, qk_scale, cap, window,
            False, EVEN_M, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, BLOCK_M)
        dk, dv = _attention_bwd_dkdv_tiles(
            dk, dv, k, v, Qh, DOh, Stats_h, Delta_h, Docs, stride_qm, stride_qd, stride_dom, stride_dod,
            offs_n, offs_d, kdoc, mid_hi, hi, Tq, Tk, qk_scale, cap, window,
            True, EVEN_M, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, BLOCK_M)

    out = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _attention_bwd_dq_tile(
    dq, q, do, m, rl, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n, offs_d,
    qdoc, kdoc, Tq, Tk, qk_scale, cap, window,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DOCS: tl.constexpr, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Add one key tile's share to dQ of one query tile; MASKED as in the forward."""
    k = _load_rows(K, offs_n, offs_d, stride_kn, stride_kd, Tk, MASKED)
    v = _load_rows(V, offs_n, offs_d, stride_vn, stride_vd, Tk, MASKED)
    x, c, t = _scores(_dot(q, tl.trans(k), IN_DTYPE, UPCAST, PREC), qk_scale, cap, SOFTCAP)
    p = tl.math.exp2(x * c - m[:, None]) * rl[:, None]
    if MASKED:
        keep = _visible(offs_m[:, None], offs_n[None, :], Tq, Tk, window, qdoc[:, None], kdoc[None, :],
                        CAUSAL, HAS_WINDOW, HAS_DOCS)
        p = tl.where(keep, p, 0.0)
    dp = _dot(do, tl.trans(v), IN_DTYPE, UPCAST, PREC)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return dq + _dot(ds, k, IN_DTYPE, UPCAST, PREC)


@triton.jit
def _attention_bwd_dq_tiles(
    dq, q, do, m, rl, delta, K, V, Docs, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d,
    qdoc, lo, hi, Tq, Tk, qk_scale, cap, window,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DOCS: tl.constexpr, IN_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate dQ of one query tile over the key tiles [lo, hi); skipping as in the forward."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = tl.multiple_of(start_n, BLOCK_N) + tl.arange(0, BLOCK_N)
        if HAS_DOCS:
            kdoc = _load_docs(Docs, offs_n, Tk)
            if _share_docs(qdoc, kdoc):
                dq = _attention_bwd_dq_tile(
                    dq, q, do, m, rl, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                    offs_n, offs_d, qdoc, kdoc, Tq, Tk, qk_scale, cap, window,
                    MASKED, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC)
        else:
            dq = _attention_bwd_dq_tile(
                dq, q, do, m, rl, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                offs_n, offs_d, qdoc, offs_n, Tq, Tk, qk_scale, cap, window,
                MASKED, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, O, Stats, Delta, DQ, Docs,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_docb, H, GROUP, Tq, Tk, qk_scale, sm_scale, cap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DOCS: tl.constexpr,
    HEAD_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch, query head): dQ of BLOCK_M queries, and their delta
    (written to Delta for the dK/dV kernel, which runs after this one)."""
    m0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    K += b * stride_kb + (h // GROUP) * stride_kh
    V += b * stride_vb + (h // GROUP) * stride_vh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < Tq
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Tq, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Tq, True)
    m, rl = _load_stats(Stats + bh * 2 * Tq, offs_m, Tq, True)
    # delta for this kernel and the dK/dV kernel after it, from the rows this program holds
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Tq, True)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(Delta + bh * Tq + offs_m, delta, mask=row_ok)
    IN_DTYPE: tl.constexpr = Q.dtype.element_ty
    if HAS_DOCS:
        Docs += b * stride_docb
        qdoc = _load_docs(Docs, offs_m, Tq)
    else:
        qdoc = offs_m  # unused

    dq = tl.zeros((BLOCK_M, HEAD_D), dtype=ACC)
    lo, mid_lo, mid_hi, hi = _key_range(m0, Tq, Tk, window, CAUSAL, HAS_WINDOW, HAS_DOCS, BLOCK_M, BLOCK_N)
    dq = _attention_bwd_dq_tiles(dq, q, do, m, rl, delta, K, V, Docs, stride_kn, stride_kd, stride_vn, stride_vd,
                                 offs_m, offs_d, qdoc, lo, mid_lo, Tq, Tk, qk_scale, cap, window,
                                 True, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, BLOCK_N)
    dq = _attention_bwd_dq_tiles(dq, q, do, m, rl, delta, K, V, Docs, stride_kn, stride_kd, stride_vn, stride_vd,
                                 offs_m, offs_d, qdoc, mid_lo, mid_hi, Tq, Tk, qk_scale, cap, window,
                                 False, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, BLOCK_N)
    dq = _attention_bwd_dq_tiles(dq, q, do, m, rl, delta, K, V, Docs, stride_kn, stride_kd, stride_vn, stride_vd,
                                 offs_m, offs_d, qdoc, mid_hi, hi, Tq, Tk, qk_scale, cap, window,
                                 True, CAUSAL, HAS_WINDOW, SOFTCAP, HAS_DOCS, IN_DTYPE, UPCAST, PREC, BLOCK_N)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------- launchers

def _bucket(t):
    """Sequence lengths that share one autotuning result (a new Tk at every decoding step must
    not re-tune): the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(t))


def heavy_features(kind, softcap=None, doc_ids=None, group=1):
    """Whether `kind`'s specialisation takes FEATURE_CONFIGS (see there)."""
    if kind == "fwd":
        return softcap is not None
    if kind == "dq":
        return doc_ids is not None
    return kind == "dkdv" and (softcap is not None or doc_ids is not None or group > 1)


def cuda_configs(kind, head_d, dtype=torch.bfloat16, heavy=False):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) list autotuned for `kind` at head dim D;
    heavy: a specialisation of heavy_features."""
    if dtype in (torch.float32, torch.float64):
        return WIDE_CONFIGS
    key = (kind, 128 if head_d == 128 else 64)
    return FEATURE_CONFIGS.get(key, CUDA_CONFIGS[key]) if heavy else CUDA_CONFIGS[key]


@functools.lru_cache(maxsize=None)
def _tuned(kernel, kind, head_d, dtype, bucket_q, bucket_k, heavy):
    """An autotuner over cuda_configs for one kernel, head dim, dtype, pair of length buckets and
    feature weight."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s,
                             pre_hook=_set_kv_blocks if kind == "fwd" else None)
               for bm, bn, w, s in cuda_configs(kind, head_d, dtype, heavy)]
    return triton.autotune(configs, key=["CAUSAL", "HAS_WINDOW", "SOFTCAP", "HAS_DOCS"])(kernel)


def _launch(kernel, kind, grid, args, constexprs, Tq, Tk, heavy=False):
    """Launch with the fixed interpreter config, or autotuned on CUDA; grid(BLOCK_M, BLOCK_N).
    args[0] is q (its dtype picks the config list)."""
    if interpreting():
        bm, bn, warps, stages = INTERPRET_CONFIG[kind]
        if kind == "fwd":
            _set_kv_blocks(dict(zip(kernel.arg_names, args), BLOCK_N=bn, HEAD_D=constexprs["HEAD_D"]))
        kernel[grid(bm, bn)](*args, **constexprs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        return
    tuned = _tuned(kernel, kind, constexprs["HEAD_D"], args[0].dtype, _bucket(Tq), _bucket(Tk), heavy)
    tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)


def _dot_options(dtype):
    """UPCAST, PREC and ACC constexprs: bf16 dots upcast in the interpreter; fp32 and fp64 dots in
    full precision (no tf32); fp64 inputs accumulate in fp64 (for gradcheck), the others in fp32."""
    upcast = interpreting() and dtype == torch.bfloat16
    prec = "ieee" if dtype in (torch.float32, torch.float64) or upcast else "tf32"
    return dict(UPCAST=upcast, PREC=prec, ACC=acc_dtype(dtype))


def _empty_bthd(B, H, T, D, like):
    """A (B, H, T, D) tensor over (B, T, H, D) memory: what the model transposes back for free."""
    return torch.empty((B, T, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _positive_scale(q, sm_scale):
    """(q', scale') with q' . k * scale' == q . k * sm_scale exactly and scale' > 0, which the
    kernels assume (_scores). Negation is exact; a zero scale becomes q' = 0 at scale 1 (every
    score exactly 0). Only a scale <= 0 costs a copy of q."""
    if sm_scale > 0:
        return q, sm_scale
    if sm_scale < 0:
        return -q, -sm_scale
    return torch.zeros_like(q), 1.0


def _options(q, causal, sm_scale, window, softcap, doc_ids):
    """(scalars, constexprs) every kernel but delta takes: scalars = (docs, stride_docb, qk_scale,
    cap, window) as _scores and _visible read them (docs: int64 ids, or None); sm_scale > 0."""
    if softcap is None:
        qk_scale, cap = sm_scale * LOG2E, 0.0
    else:
        qk_scale, cap = sm_scale / softcap, softcap * LOG2E
    docs = None if doc_ids is None else doc_ids.to(torch.int64).contiguous()
    scalars = (docs, 0 if docs is None else docs.stride(0), qk_scale, cap, 0 if window is None else window)
    constexprs = dict(CAUSAL=causal, HAS_WINDOW=window is not None, SOFTCAP=softcap is not None,
                      HAS_DOCS=doc_ids is not None, HEAD_D=q.shape[3], **_dot_options(q.dtype))
    return scalars, constexprs


def _attention_fwd(q, k, v, causal, sm_scale, window, softcap, doc_ids):
    """(o, stats): the output (q's dtype, _empty_bthd layout) and the softmax statistics
    (B, H, 2, Tq): per query the base-2 row max m and 1 / l (fp32; fp64 for fp64 inputs)."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    o = _empty_bthd(B, H, Tq, D, q)
    stats = _empty_stats(q)
    q, sm_scale = _positive_scale(q, sm_scale)
    (docs, stride_docb, qk_scale, cap, win), constexprs = _options(q, causal, sm_scale, window, softcap, doc_ids)
    kd, vd = _kv_descriptors(k, v)
    args = (q, k, v, o, stats, docs, kd, vd, *_strides(q, k, v, o), stride_docb, H, H // H_kv, Tq, Tk, qk_scale,
            cap, win)
    _launch(_attention_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(Tq, bm), B * H), args,
            dict(constexprs, TMA=kd is not None), Tq, Tk, heavy_features("fwd", softcap))
    return o, stats


def _kv_descriptors(k, v):
    """TMA tensor descriptors of the (B, H_kv, Tk, D) keys and values for the forward, or (None,
    None) where the copy engine cannot take them (_utils.has_tma and tma_layout_ok: fp32/fp64, a
    sliced or expanded view, a GPU before Hopper). The block shape is set at launch, once the
    tile config is known (_set_kv_blocks)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not has_tma(k.device) or not (tma_layout_ok(k) and tma_layout_ok(v)):
        return None, None
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[-1]]) for t in (k, v))


def _set_kv_blocks(nargs):
    """Autotuning pre-hook (and the interpreter's launch): the descriptors' block is one key tile."""
    for name in ("Kd", "Vd"):
        if nargs.get(name) is not None:
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_D"]]


def _empty_stats(q):
    B, H, Tq, _ = q.shape
    return torch.empty((B, H, 2, Tq), dtype=acc_torch_dtype(q.dtype), device=q.device)


def _attention_bwd(do, q, k, v, o, stats, causal, sm_scale, window, softcap, doc_ids):
    """(dq, dk, dv) in the inputs' dtype, each in _empty_bthd layout (dk, dv with k's heads)."""
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    do = do.to(q.dtype)
    if _slice_span(do) >= 2**31:  # an upstream gradient with huge strides: 32-bit offsets need a copy
        do = do.contiguous()
    delta = torch.empty((B, H, Tq), dtype=acc_torch_dtype(q.dtype), device=q.device)  # written by the dQ kernel
    dq = _empty_bthd(B, H, Tq, D, q)
    dk = _empty_bthd(B, H_kv, Tk, D, k)
    dv = _empty_bthd(B, H_kv, Tk, D, v)
    dq_scale = sm_scale  # dQ = sm_scale * dS K;  dK = sm_scale * dS^T Q = scale' * dS^T Q'
    q, sm_scale = _positive_scale(q, sm_scale)
    (docs, stride_docb, qk_scale, cap, win), options = _options(q, causal, sm_scale, window, softcap, doc_ids)
    scalars = (stride_docb, H, H // H_kv, Tq, Tk, qk_scale)
    rest = (cap, win)
    # EVEN_M is fixed per launch, before autotuning picks BLOCK_M: it holds when Tq is a multiple
    # of every query tile a dK/dV config may use.
    heavy = heavy_features("dkdv", softcap, doc_ids, H // H_kv)
    configs = [INTERPRET_CONFIG["dkdv"]] if interpreting() else cuda_configs("dkdv", D, q.dtype, heavy)
    even_m = all(Tq % bm == 0 for bm, *_ in configs)
    _launch(_attention_bwd_dq_kernel, "dq", lambda bm, bn: (triton.cdiv(Tq, bm), B * H),
            (q, k, v, do, o, stats, delta, dq, docs, *_strides(q, k, v, do, o, dq), *scalars, dq_scale, *rest),
            options, Tq, Tk, heavy_features("dq", doc_ids=doc_ids))
    _launch(_attention_bwd_dkdv_kernel, "dkdv", lambda bm, bn: (triton.cdiv(Tk, bn), B * H_kv),
            (q, k, v, do, stats, delta, dk, dv, docs, *_strides(q, k, v, do, dk), *scalars, sm_scale, *rest),
            dict(options, EVEN_M=even_m), Tq, Tk, heavy)
    return dq, dk, dv


# ---------------------------------------------------------------- custom ops (autograd, torch.compile)

@torch.library.custom_op("tritongpt::flash_attention_fwd", mutates_args=())
def flash_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                           sm_scale: float, window: Optional[int] = None, softcap: Optional[float] = None,
                           doc_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_fwd(q, k, v, causal, sm_scale, window, softcap, doc_ids)


@flash_attention_fwd_op.register_fake
def _(q, k, v, causal, sm_scale, window=None, softcap=None, doc_ids=None):
    B, H, Tq, D = q.shape
    return _empty_bthd(B, H, Tq, D, q), _empty_stats(q)


@torch.library.custom_op("tritongpt::flash_attention_bwd", mutates_args=())
def flash_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, stats: torch.Tensor, causal: bool, sm_scale: float,
                           window: Optional[int] = None, softcap: Optional[float] = None,
                           doc_ids: Optional[torch.Tensor] = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd(do, q, k, v, o, stats, causal, sm_scale, window, softcap, doc_ids)


@flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, stats, causal, sm_scale, window=None, softcap=None, doc_ids=None):
    B, H, Tq, D = q.shape
    H_kv, Tk = k.shape[1], k.shape[2]
    return _empty_bthd(B, H, Tq, D, q), _empty_bthd(B, H_kv, Tk, D, k), _empty_bthd(B, H_kv, Tk, D, v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, window, softcap, doc_ids = inputs
    o, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, o, stats, doc_ids)
    ctx.options = (causal, sm_scale, window, softcap)


def _backward(ctx, do, _dstats):
    q, k, v, o, stats, doc_ids = ctx.saved_tensors
    causal, sm_scale, window, softcap = ctx.options
    dq, dk, dv = flash_attention_bwd_op(do, q, k, v, o, stats, causal, sm_scale, window, softcap, doc_ids)
    return dq, dk, dv, None, None, None, None, None


flash_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public function

def _slice_span(t):
    """How many elements one (batch, head) slice of a (B, H, T, D) tensor spans in memory."""
    return (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))


def _check_inputs(q, k, v, causal, sm_scale):
    """Validate q, k, v, causal and sm_scale before any launch; return sm_scale as a float."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    B, H, Tq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"q's head dim (last dimension) must be one of {HEAD_DIMS}, got {D}")
    if k.shape[0] != B or k.shape[3] != D or k.shape[1] < 1 or H % k.shape[1] != 0:
        raise ValueError(f"k must have shape ({B}, H_kv, Tk, {D}) with H_kv dividing q's {H} heads "
                         f"to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if min(B, H, Tq, k.shape[2]) < 1:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):  # offsets within one (batch, head) are 32-bit
        if _slice_span(t) >= 2**31:
            raise ValueError(f"{name}: one (batch, head) slice spans 2**31 elements or more; unsupported")
    if max(Tq, k.shape[2]) * H * D >= 2**31:  # the same for the outputs, (B, T, H, D) memory
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: T * H * D must stay below 2**31 "
                         "(one (batch, head) slice of the output would need 64-bit offsets)")
    if B * H > MAX_GRID_Y:
        raise ValueError(f"q: batch x heads = {B * H} is more than the {MAX_GRID_Y} programs CUDA allows "
                         "in a grid's second dimension; split the batch")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if sm_scale is not None and not math.isfinite(real_number("sm_scale", sm_scale)):
        raise TypeError(f"sm_scale must be a finite number or None, got {sm_scale!r}")
    return 1.0 / math.sqrt(D) if sm_scale is None else real_number("sm_scale", sm_scale)


def _check_features(q, k, causal, window, softcap, doc_ids):
    """Validate window, softcap and doc_ids; return (window as an int, softcap as a float), None kept."""
    if window is not None:
        window = integer("window", window)
        if window < 1 or window >= 2**31:
            raise ValueError(f"window must be at least 1 (and below 2**31), got {window}")
        if not causal:
            raise ValueError("window needs causal=True (it keeps the most recent visible keys)")
    if softcap is not None:
        softcap = real_number("softcap", softcap)  # TypeError for a non-number (NumPy numbers are fine)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be finite and > 0, got {softcap}")
    if doc_ids is not None:
        if not isinstance(doc_ids, torch.Tensor):
            raise TypeError(f"doc_ids must be a torch.Tensor or None, got {type(doc_ids).__name__}")
        if doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex or doc_ids.dtype == torch.bool:
            raise TypeError(f"doc_ids must have an integer dtype, got {doc_ids.dtype}")
        B, _, Tq, _ = q.shape
        if tuple(doc_ids.shape) != (B, Tq):
            raise ValueError(f"doc_ids must have shape (B, T) = {(B, Tq)}, got {tuple(doc_ids.shape)}")
        if k.shape[2] != Tq:
            raise ValueError(f"doc_ids needs as many keys as queries (Tq == Tk), got Tq={Tq}, Tk={k.shape[2]}")
    return window, softcap


def flash_attention(q, k, v, causal=True, sm_scale=None, *, window=None, softcap=None, doc_ids=None):
    """Attention in Triton: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale),
    plus GQA, a sliding window, softcapped scores and document masking (== kernels.reference's).

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with H % H_kv == 0 (GQA/MQA: query head h reads kv
    head h // (H // H_kv)); one dtype (fp16, bf16, fp32 or fp64), D in {16, 32, 64, 128}, any
    strides (no copies). sm_scale defaults to 1 / sqrt(D). With causal=True and Tq != Tk the mask
    is aligned to the end: query i sees the keys j <= i + Tk - Tq (SDPA aligns it to the start);
    a query that sees no key (only possible when Tq > Tk) gets 0, not nan, and no gradient.
    window (int >= 1, causal only): query i sees only keys j > i + Tk - Tq - window, the `window`
    most recent visible ones (itself included); key tiles outside every query's window are not read.
    softcap (float > 0): scores s = sm_scale * q.k become softcap * tanh(s / softcap).
    doc_ids ((B, T) integers, Tq == Tk): query i sees key j only if doc_ids[b, i] == doc_ids[b, j]
    (and the other masks allow it). Any ids are right; key tiles whose id range does not overlap
    the query tile's are skipped, so ids that do not decrease along T (packed documents) make a
    batch of short documents proportionally cheaper. With a window and documents the window counts
    positions, which is the `window` most recent keys of the document when documents are contiguous.
    Returns q's dtype and shape, laid out as (B, Tq, H, D) memory. Differentiable in q, k and v
    (first order); the backward is deterministic (a kv head's dK, dV sum its group in a fixed order).
    No dropout, no arbitrary masks.
    """
    sm_scale = _check_inputs(q, k, v, causal, sm_scale)
    window, softcap = _check_features(q, k, causal, window, softcap, doc_ids)
    check_device({"q": q, "k": k, "v": v, "doc_ids": doc_ids})
    return flash_attention_fwd_op(q, k, v, causal, sm_scale, window, softcap, doc_ids)[0]
