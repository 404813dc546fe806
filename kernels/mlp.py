"""GPT-2's MLP, Linear -> GELU -> Linear, as Triton matmuls with the GELU and biases in their epilogues.

Forward: h = x W1^T + b1 and g = gelu(h) come out of one Triton matmul (the bias and the GELU are
applied to the accumulator before the single store), then y = g W2^T + b2. Backward: one Triton
matmul computes dg = dy W2 and multiplies it by gelu'(h) in its epilogue, so the 4C-wide dh is
written once and no elementwise pass over the activation exists; the same epilogue writes
per-program fp32 column sums of dh (db1's partials, summed by one torch sum: deterministic, no
atomics). The four plain GEMMs, y = g W2^T + b2, dx = dh W1, dW1 = dh^T x and dW2 = dy^T g, go
through torch.mm / addmm (cuBLAS on CUDA, fp32 accumulation for bf16/fp16) by default; with
PLAIN_GEMM = "triton" they use the same Triton matmul kernel instead, the weight gradients then
splitting K (the rows) over programs that write fp32 partials summed by torch (GPT-2 shapes have
few output tiles, 72 to 144 for 132 SMs, and a long K), again deterministic. db2 = dy summed over
rows in fp32 by torch (a C-wide pass, not a 4C one).

Matmuls: tiles of BLOCK_M x BLOCK_N with fp32 accumulation (fp64 for fp64 inputs) over BLOCK_K
steps, programs in grouped order (GROUP_M row tiles share a column band, for L2 reuse), a short
autotune list for H100 (a single small config in the interpreter). Operands are read through
strides, so transposed weights and non-contiguous x need no copies.

The two epilogue GEMMs in Hopper form (_mlp_epilogue_tma_kernel): on sm_90 and newer (and in the
interpreter, so the CPU tests run it), fp16/bf16 operands the copy engine can address (unit inner
stride, 16-byte aligned rows; either orientation of the weight) and a hidden size that is a
multiple of 8 go through a persistent kernel: one or two programs per SM walk the tiles, A and B
tiles arrive by TMA (zero-filled past the edges, so no masks), the outputs leave by TMA stores that
drain while the next tile starts, and h (backward) and the bias (fc) are read before the K loop,
so their latency hides behind the MMAs. Everything else (fp32/fp64, sliced or odd-width layouts,
GPUs before Hopper) takes the pointer kernels below.

Saved for backward: the pre-activation h and the activation g (both M x H in x's dtype), as
PyTorch eager saves them. Why save h rather than recompute it (decided by reasoning, GPU
measurement owed): at GPT-2 124M (M = 16384, C = 768, H = 3072, bf16) storing h costs one extra
100 MB write in the forward and a 100 MB read in the backward, about 0.07 ms at 3 TB/s, while
recomputing it is a whole extra matmul of 2*M*C*H = 77 GFLOP, about 0.13 ms at 600 TFLOP/s, plus
re-reading x and W1. g is needed by dW2 and exists anyway (it is the second matmul's input).

The GELU: "tanh" (GPT-2's, default) g = h * sigmoid(2u), u = sqrt(2/pi) (h + 0.044715 h^3), which
equals 0.5 h (1 + tanh(u)); "none" the exact g = h * Phi(h) with erf, as F.gelu's `approximate`.

fp32 inputs: the dots use true fp32 ("ieee") unless torch.backends.cuda.matmul.allow_tf32 is set,
then TF32, following what PyTorch's own fp32 matmul does. Their GELU and GELU' epilogues compute in
fp64 (the EPI constexpr), so the stored activation and dh are the accumulator's exact function
correctly rounded; fp16 and bf16 keep an fp32 epilogue, far below their own rounding. bf16 in Triton's interpreter: tl.dot
there multiplies bf16 bit patterns, so the tiles are converted to fp32 before the dot there.
Limits: x (..., C) with any C (C = 0 gives the biases, as F.linear), hidden size and row count
(edges masked); all five tensors one dtype (as F.linear requires), any strides (biases too, an
expanded one included); row offsets in int64.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, acc_torch_dtype, check_device, check_tensor, has_tma, interpreting, needs_grad, \
    num_programs_for, or_empty, tma_layout_ok

APPROXIMATIONS = ("tanh", "none")
# Split K only when each split gets at least this many rows, and at most MAX_SPLIT ways.
MIN_K_PER_SPLIT = 1024
MAX_SPLIT = 8
# Shared memory the pipelined A and B tiles may take (A100 allows 163 KB per block, H100 227 KB).
SMEM_BUDGET = 160 * 1024
_FALLBACK = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=8)  # when no config fits the budget
# Who computes the four plain GEMMs (proj, dx, dW1, dW2): "cublas" (torch.mm / torch.addmm, the
# default; issue 16: Triton's plain matmul loses to cuBLAS on H100 unless shown otherwise) or
# "triton" (_mlp_fwd_kernel, split-K for the weight gradients); bench/bench_mlp.py compares both.
PLAIN_GEMM = "cublas"


def gpu_configs(epilogue=False):
    """The autotune list on GPU (pruned for H100), as dicts; kernels.inspect compiles every entry.

    epilogue=True is the list for the kernels with a GELU (or GELU') epilogue: only tiles with 64
    fp32 accumulators per thread, since at 128 per thread that epilogue spills (kernels.inspect).
    """
    if epilogue:
        return [
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
            dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        ]
    # The plain list (PLAIN_GEMM = "triton"): the 128 x 256 Hopper tile, which needs a whole SM, and
    # tiles that fit two programs per SM on sm_90 (128 x 128 at 8 warps: 3 stages, not 4, for that).
    # 128 x 128 at 4 warps is gone: 208 registers left 4 warps resident per SM.
    return [
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    ]


def tma_configs():
    """The autotune list of the persistent TMA kernel (fc + GELU and dh, on Hopper), as dicts.
    PROGRAMS_PER_SM: how many of its programs one SM holds (registers and shared memory, checked by
    kernels.inspect's test), which sizes the persistent grid. 128 x 128 at 8 warps is the Hopper
    GEMM tile (two consumer warpgroups of 64 rows); 64 x 128 at 4 warps fits two programs per SM,
    so one program's GELU epilogue runs while the other's MMAs do."""
    return [
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, PROGRAMS_PER_SM=1),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3, PROGRAMS_PER_SM=2),
    ]


def tma_autotune_configs():
    """tma_configs, or one small config in the interpreter (small enough that the tests' shapes
    span several tiles per program)."""
    if interpreting():
        return [dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1, PROGRAMS_PER_SM=1)]
    return tma_configs()


def autotune_configs(epilogue=False):
    """The configs the launchers autotune over: gpu_configs, or one small config in the interpreter."""
    if interpreting():
        return [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=1)]
    return gpu_configs(epilogue)


def _triton_configs(configs, keys=("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), pre_hook=None):
    """triton.Config objects of the dicts in `configs`: `keys` become the kernel's constexprs."""
    return [triton.Config({k: c[k] for k in keys}, num_warps=c["num_warps"], num_stages=c["num_stages"],
                          pre_hook=pre_hook)
            for c in configs]


def _fit_shared_memory(configs, named_args, **kwargs):
    """Autotune pruning: the lists are sized for 16-bit tiles; with fp32 or fp64 operands a config
    keeps fewer pipeline stages (down to 1) so its A and B tiles fit SMEM_BUDGET, or is dropped."""
    itemsize = named_args[next(iter(named_args))].element_size()  # the first argument is A
    fitted = []
    for config in configs:
        kw = config.kwargs
        stage_bytes = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * itemsize
        stages = min(config.num_stages, SMEM_BUDGET // stage_bytes)
        if stages >= 1:
            fitted.append(triton.Config(kw, num_warps=config.num_warps, num_stages=stages))
    return fitted or [triton.Config(dict(_FALLBACK), num_warps=4, num_stages=1)]


# ---------------------------------------------------------------- GELU and its derivative

@triton.jit
def _gelu(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        # 0.5 h (1 + tanh(u)) = h * sigmoid(2u); exp overflow gives p = 0 or 1, never nan
        u2 = 1.5957691216057308 * (h + 0.044715 * h * h * h)
        return h / (1.0 + tl.exp(-u2))
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        # d/dh [h p], p = sigmoid(2u): p + h p (1 - p) 2u',  2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 h^2)
        u2 = 1.5957691216057308 * (h + 0.044715 * h * h * h)
        p = 1.0 / (1.0 + tl.exp(-u2))
        return p + h * p * (1.0 - p) * 1.5957691216057308 * (1.0 + 0.134145 * h * h)
    # Phi(h) + h phi(h)
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


# ---------------------------------------------------------------- the matmul main loop

@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile number `tile` in grouped order: GROUP_M row tiles walk one column
    band together, so the band's B tiles are read from L2 rather than DRAM."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program's tile (one tile a program)."""
    return _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _matmul_tile(A, B, M, N, K, k_start, k_end, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                 ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = A[rows, k_start:k_end] @ B[k_start:k_end, cols] in ACC (k_end <= K).

    Rows and columns past M, N wrap around (modulo) instead of being masked: their results are
    never stored, and the loads stay unmasked along M and N. K is masked.
    """
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    k0 = tl.cast(k_start, tl.int64)  # k can be a row index (weight gradients): k * stride passes 2**31
    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + (k0 + offs_k[None, :]) * stride_ak
    b_ptrs = B + (k0 + offs_k[:, None]) * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(k_start, k_end, BLOCK_K):
        # masked against K, not k_end: K - k keeps K's divisibility by 16 (k_end, a minimum, would
        # not), so the compiler can vectorise the loads along a k-contiguous operand
        k_left = K - k
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # out_dtype: Triton 3.6 asserts that an fp64 accumulator matches it (it defaults to fp32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# Out = A @ B (+ bias), optionally gelu'd, for the forward's two matmuls and the backward's dx and
# weight gradients. With GELU, Pre receives the pre-activation (when STORE_PRE). Program
# (tile, s) of a split-K launch covers K rows [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT) and writes
# slice s of Out (fp32 partials, summed by the launcher).
@triton.jit
def _mlp_fwd_kernel(
    A, B, Bias, Out, Pre,
    M, N, K, K_PER_SPLIT, M_KEY, K_KEY,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on, stride_os, stride_bias,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, STORE_PRE: tl.constexpr, APPROX_TANH: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EPI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = _matmul_tile(A, B, M, N, K, k_start, k_end, stride_am, stride_ak, stride_bk, stride_bn, pid_m, pid_n,
                       ACC, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if GELU:  # the bias add and the GELU in EPI (see _dot_options)
        acc = acc.to(EPI)
    if HAS_BIAS:
        acc += tl.load(Bias + cols * stride_bias, mask=cols < N, other=0.0).to(acc.dtype)[None, :]
    offs = split.to(tl.int64) * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    if GELU:
        if STORE_PRE:
            tl.store(Pre + offs, acc.to(Pre.dtype.element_ty), mask=mask)
        acc = _gelu(acc, APPROX_TANH)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


# With h the pre-activation and g = gelu(h): dg = dy @ W2, and dh = dg * gelu'(h) is written here
# (gelu' applied to the accumulator in EPI, h read in the epilogue). db1 = sum over rows of dh:
# program (pid_m, pid_n) writes its tile's fp32 column sums to row pid_m of DBp.
@triton.jit
def _mlp_bwd_kernel(
    DY, W2, Pre, DPre, DBp,
    M, N, K, M_KEY,
    stride_dym, stride_dyk, stride_wk, stride_wn, stride_pm, stride_pn,
    NEED_DB: tl.constexpr, APPROX_TANH: tl.constexpr,
    ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EPI: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _matmul_tile(DY, W2, M, N, K, 0, K, stride_dym, stride_dyk, stride_wk, stride_wn, pid_m, pid_n,
                       ACC, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_pm + cols[None, :] * stride_pn
    h = tl.load(Pre + offs, mask=mask, other=0.0).to(EPI)
    dh = acc.to(EPI) * _gelu_grad(h, APPROX_TANH)
    tl.store(DPre + offs, dh.to(DPre.dtype.element_ty), mask=mask)
    if NEED_DB:
        db = tl.sum(tl.where(mask, dh, 0.0), axis=0)
        tl.store(DBp + pid_m * N + cols, db.to(DBp.dtype.element_ty), mask=cols < N)


# ---------------------------------------------------------------- the Hopper form of the two epilogue GEMMs

@triton.jit
def _tma_dot_tile(Ad, Bd, off_m, off_n, K, B_KN: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc = A[off_m:, :] @ B[:, off_n:] over all of K, both tiles through TMA: Ad is an (M, K)
    descriptor; Bd a (K, N) one (B_KN: W2 for the backward) or an (N, K) one (B = W1^T for fc).
    The copy engine fills rows and columns past the tensors' ends with zeros, so edge tiles need
    no masks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, K, BLOCK_K):
        a = Ad.load([off_m, k])
        if B_KN:
            b = Bd.load([k, off_n])
        else:
            b = tl.trans(Bd.load([off_n, k]))
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


# fc (BACKWARD false): Od gets gelu(A B + bias) and Pd the pre-activation A B + bias (when STORE_PRE),
# B = W1^T. Backward: Od gets dh = (A B) * gelu'(h), A = dy, B = W2, h read from Pre; DBp db1's
# per-row-tile fp32 partials (as _mlp_bwd_kernel). Od, Pd: (M, N) descriptors, written by TMA stores
# that drain while the program goes on. Persistent: program p computes tiles p, p + P, p + 2P, ...
# (P programs: PROGRAMS_PER_SM on each SM, as many as fit). h and the bias are read before the
# tile's K loop, so their DRAM latency hides behind the MMAs instead of following the last
# accumulation wait; h through pointers, since a descriptor load waits for its data where it is
# issued. Triton's automatic warp specialisation (tl.range(warp_specialize=True)) compiles to the
# same cubin as without it on sm_90 in Triton 3.6 and 3.9, and flattening the two loops (flatten=True)
# multiplies the loop's code (1577 instructions for fc, with a stack frame for the backward), so
# neither is used.
@triton.jit
def _mlp_epilogue_tma_kernel(
    Ad, Bd, Bias, Pre, Pd, Od, DBp,
    M, N, K, M_KEY, stride_bias, stride_pm, stride_pn,
    BACKWARD: tl.constexpr, B_KN: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr,
    NEED_DB: tl.constexpr, APPROX_TANH: tl.constexpr, ACC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EPI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr,
):
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        cols = off_n + tl.arange(0, BLOCK_N)
        if BACKWARD:
            rows = tl.arange(0, BLOCK_M)
            mask = (off_m + rows < M)[:, None] & (cols < N)[None, :]
            h = tl.load(Pre + off_m.to(tl.int64) * stride_pm + rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                        mask=mask, other=0.0)
        elif HAS_BIAS:
            bias = tl.load(Bias + cols * stride_bias, mask=cols < N, other=0.0)
        acc = _tma_dot_tile(Ad, Bd, off_m, off_n, K, B_KN, ACC, DOT_PRECISION, UPCAST,
                            BLOCK_M, BLOCK_N, BLOCK_K).to(EPI)
        if BACKWARD:
            # rows past M hold dh = 0 (zero-filled A, h = 0), so the column sums need no mask
            dh = acc * _gelu_grad(h.to(EPI), APPROX_TANH)
            Od.store([off_m, off_n], dh.to(Od.dtype))
            if NEED_DB:
                tl.store(DBp + pid_m * N + cols, tl.sum(dh, axis=0).to(DBp.dtype.element_ty), mask=cols < N)
        else:
            if HAS_BIAS:
                acc += bias.to(EPI)[None, :]
            if STORE_PRE:
                Pd.store([off_m, off_n], acc.to(Pd.dtype))
            Od.store([off_m, off_n], _gelu(acc, APPROX_TANH).to(Od.dtype))


# Two autotuners over one kernel: the plain matmuls (proj, dx, weight gradients) and fc with its GELU.
# The tuning key includes the tensors' dtypes (Triton adds them), so each dtype is pruned and tuned.
_PRUNE = {"early_config_prune": _fit_shared_memory}
_PLAIN_CONFIGS = _triton_configs(autotune_configs())
_EPILOGUE_CONFIGS = _triton_configs(autotune_configs(epilogue=True))
# The keys use M_KEY / K_KEY, the shape with its row dimension (which changes with batch x length)
# rounded up to a power of two (rows_key), so a new batch size or prompt length reuses a tuning
# instead of benchmarking every config again; the other dimensions (the model's widths) are exact.
_mlp_fwd_tuned = triton.autotune(_PLAIN_CONFIGS, key=["M_KEY", "N", "K_KEY"], prune_configs_by=_PRUNE)(_mlp_fwd_kernel)
_mlp_fwd_gelu_tuned = triton.autotune(_EPILOGUE_CONFIGS, key=["M_KEY", "N", "K_KEY", "STORE_PRE"],
                                      prune_configs_by=_PRUNE)(_mlp_fwd_kernel)
# reset_to_zero: configs of different BLOCK_M fill different rows of DBp; rows a benchmarked config
# wrote and the chosen one does not would otherwise enter the sum
_mlp_bwd_tuned = triton.autotune(_EPILOGUE_CONFIGS, key=["M_KEY", "N", "K", "NEED_DB"], reset_to_zero=["DBp"],
                                 prune_configs_by=_PRUNE)(_mlp_bwd_kernel)


def _set_tma_blocks(nargs):
    """Autotuning pre-hook: each descriptor's block is the config's tile of its tensor."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["Ad"].block_shape = [bm, bk]
    nargs["Bd"].block_shape = [bk, bn] if nargs["B_KN"] else [bn, bk]
    for name in ("Pd", "Od"):
        if nargs[name] is not None:
            nargs[name].block_shape = [bm, bn]


_TMA_CONFIGS = _triton_configs(tma_autotune_configs(), ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PROGRAMS_PER_SM"),
                               _set_tma_blocks)
_mlp_fc_tma_tuned = triton.autotune(_TMA_CONFIGS, key=["M_KEY", "N", "K", "STORE_PRE", "B_KN"])(
    _mlp_epilogue_tma_kernel)
_mlp_bwd_tma_tuned = triton.autotune(_TMA_CONFIGS, key=["M_KEY", "N", "K", "NEED_DB", "B_KN"],
                                     reset_to_zero=["DBp"])(_mlp_epilogue_tma_kernel)


# ---------------------------------------------------------------- launchers

def _dot_options(dtype, device):
    """(ACC, DOT_PRECISION, UPCAST, EPI) constexprs for inputs of `dtype`.

    EPI is the dtype the GELU and GELU' epilogues compute in: fp64 for fp32 (and fp64) inputs, so
    the stored activation and dh are the fp32 accumulator's values correctly rounded (an fp32 exp
    and division add 1-2 ulp, more than PyTorch's own GELU); fp32 for fp16 and bf16, whose rounding
    on the store is 2**13 times coarser than the fp32 epilogue's error.
    """
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    precision = "ieee" if dtype in (torch.float32, torch.float64) and not tf32 else "tf32"
    upcast = dtype == torch.bfloat16 and interpreting()
    epilogue = tl.float64 if dtype in (torch.float32, torch.float64) else tl.float32
    return dict(ACC=acc_dtype(dtype), DOT_PRECISION=precision, UPCAST=upcast, EPI=epilogue)


def rows_key(n):
    """A row count as the autotune keys see it: rounded up to a power of two."""
    return triton.next_power_of_2(max(n, 1))


def _grid(M, N, splits=1):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)


def _split_k(M, N, K, device):
    """How many ways to split K: enough programs for two per SM at 128 x 128 tiles, each split at
    least MIN_K_PER_SPLIT long. Returns (splits, K per split)."""
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    splits = min(MAX_SPLIT, triton.cdiv(2 * num_programs_for(device), tiles), K // MIN_K_PER_SPLIT)
    if splits <= 1:
        return 1, K
    align = max(c["BLOCK_K"] for c in autotune_configs())  # a split is whole BLOCK_K steps
    per_split = triton.cdiv(triton.cdiv(K, splits), align) * align
    return triton.cdiv(K, per_split), per_split


def _matmul(a, b, bias=None, gelu=None, store_pre=False, split_ok=False):
    """a (M, K) @ b (K, N) (+ bias) -> (M, N) in a's dtype, any strides; with gelu ("tanh" or "none")
    returns (gelu(out), out) where out is the pre-activation (None unless store_pre).
    split_ok: K may be split over programs (fp32 partials summed here; for weight gradients)."""
    M, K = a.shape
    N = b.shape[1]
    pre = torch.empty((M, N), dtype=a.dtype, device=a.device) if store_pre else None
    if M == 0 or N == 0 or K == 0:  # nothing to multiply: the bias (or zero) broadcast, gelu'd
        out = torch.zeros((M, N), dtype=a.dtype, device=a.device) + (0 if bias is None else bias)
        if store_pre:
            pre.copy_(out)
        return (_torch_gelu(out, gelu), pre) if gelu else out
    tma = _tma_operands(a, b) if gelu is not None else None
    if tma is not None:
        return _fc_gelu_tma(a, bias, gelu, store_pre, *tma)
    splits, per_split = _split_k(M, N, K, a.device) if split_ok else (1, K)
    out_dtype = acc_torch_dtype(a.dtype) if splits > 1 else a.dtype
    out = torch.empty((splits, M, N), dtype=out_dtype, device=a.device)
    kernel = _mlp_fwd_tuned if gelu is None else _mlp_fwd_gelu_tuned
    kernel[_grid(M, N, splits)](
        a, b, bias, out, pre,
        # the rows are K for the weight gradients (split_ok), M for every other product
        M, N, K, per_split, M if split_ok else rows_key(M), rows_key(K) if split_ok else K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), N, 1, M * N, 0 if bias is None else bias.stride(0),
        HAS_BIAS=bias is not None, GELU=gelu is not None, STORE_PRE=store_pre,
        APPROX_TANH=gelu == "tanh", **_dot_options(a.dtype, a.device),
    )
    out = out[0] if splits == 1 else out.sum(0).to(a.dtype)
    return (out, pre) if gelu else out


def _descriptor(t):
    """A TMA descriptor over the 2-D tensor t; its block is set per config (_set_tma_blocks)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])


def _tma_operands(a, b):
    """(Ad, Bd, b_kn): descriptors over a (M, K) and b (K, N) for _mlp_epilogue_tma_kernel, b read
    as it lies (b_kn) or as the (N, K) matrix b^T (an nn.Linear weight); None where that kernel
    cannot run: no TMA on the device, a layout the copy engine cannot address (_utils.tma_layout_ok),
    or an output row (N elements) that is not a multiple of 16 bytes."""
    if not (has_tma(a.device) and tma_layout_ok(a)) or b.shape[1] * b.element_size() % 16:
        return None
    for b_kn, t in ((True, b), (False, b.t())):
        if tma_layout_ok(t):
            return _descriptor(a), _descriptor(t), b_kn
    return None


def _tma_grid(M, N, device):
    """The persistent grid: PROGRAMS_PER_SM programs on every SM, at most one a tile."""
    programs = num_programs_for(device)
    return lambda meta: (min(triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),
                             programs * meta["PROGRAMS_PER_SM"]),)


def _fc_gelu_tma(a, bias, gelu, store_pre, ad, bd, b_kn):
    """_matmul's fc + GELU by the persistent TMA kernel: (gelu(a b + bias), a b + bias or None)."""
    M, K = a.shape
    N = bd.shape[1] if b_kn else bd.shape[0]
    act = torch.empty((M, N), dtype=a.dtype, device=a.device)
    pre = torch.empty((M, N), dtype=a.dtype, device=a.device) if store_pre else None
    _mlp_fc_tma_tuned[_tma_grid(M, N, a.device)](
        ad, bd, bias, None, None if pre is None else _descriptor(pre), _descriptor(act), None,
        M, N, K, rows_key(M), 0 if bias is None else bias.stride(0), 0, 0,
        BACKWARD=False, B_KN=b_kn, HAS_BIAS=bias is not None, STORE_PRE=store_pre, NEED_DB=False,
        APPROX_TANH=gelu == "tanh", **_dot_options(a.dtype, a.device),
    )
    return act, pre


def _plain_matmul(a, b, bias=None, weight_grad=False):
    """a @ b (+ bias) in a's dtype by PLAIN_GEMM's backend. cuBLAS accumulates bf16/fp16 products
    in fp32 (CUBLAS_COMPUTE_32F) and, with one stream and a fixed shape, is bitwise repeatable (no
    split-K atomics; CUBLAS_WORKSPACE_CONFIG matters only across streams)."""
    if PLAIN_GEMM == "triton":
        return _matmul(a, b, bias, split_ok=weight_grad)
    if PLAIN_GEMM != "cublas":
        raise ValueError(f"kernels.mlp.PLAIN_GEMM must be 'cublas' or 'triton', got {PLAIN_GEMM!r}")
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _torch_gelu(h, approximate):
    return torch.nn.functional.gelu(h, approximate=approximate)


def _gelu_grad_matmul(dy, w2, pre, approximate, need_db):
    """dh = (dy @ w2) * gelu'(pre), and db1's fp32 partials (one row per row tile) when need_db."""
    M, K = dy.shape
    N = w2.shape[1]
    dpre = torch.empty((M, N), dtype=pre.dtype, device=pre.device)
    max_tiles_m = triton.cdiv(M, min(c["BLOCK_M"] for c in autotune_configs(epilogue=True) + tma_autotune_configs()
                                     + [_FALLBACK]))
    # zeros: autotuned configs with larger BLOCK_M fill fewer rows; the rest must add nothing
    db_part = torch.zeros((max_tiles_m, N), dtype=acc_torch_dtype(pre.dtype), device=pre.device) \
        if need_db else None
    if M == 0 or N == 0:
        return dpre, db_part
    if K == 0:  # dy @ w2 is zero
        dpre.zero_()
        return dpre, db_part
    # a real tensor even when db1 is not wanted: Triton 3.6's reset_to_zero calls .zero_() on it
    db_arg = db_part if need_db else torch.zeros(1, dtype=acc_torch_dtype(pre.dtype), device=pre.device)
    tma = _tma_operands(dy, w2)
    if tma is not None:
        ad, bd, b_kn = tma
        _mlp_bwd_tma_tuned[_tma_grid(M, N, dy.device)](
            ad, bd, None, pre, None, _descriptor(dpre), db_arg,
            M, N, K, rows_key(M), 0, pre.stride(0), pre.stride(1),
            BACKWARD=True, B_KN=b_kn, HAS_BIAS=False, STORE_PRE=False, NEED_DB=need_db,
            APPROX_TANH=approximate == "tanh", **_dot_options(dy.dtype, dy.device),
        )
        return dpre, db_part
    _mlp_bwd_tuned[_grid(M, N)](
        dy, w2, pre, dpre, db_arg,
        M, N, K, rows_key(M),
        dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1), pre.stride(0), pre.stride(1),
        NEED_DB=need_db, APPROX_TANH=approximate == "tanh", **_dot_options(dy.dtype, dy.device),
    )
    return dpre, db_part


def _rows(t):
    """t (..., n) as (M, n); explicit M, since reshape(-1, 0) is ambiguous when n = 0."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _gelu_mlp_fwd(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate, save):
    """Returns y (x.shape[:-1] + (O,)), and when save the pre-activation h and activation g (M, H)."""
    x2 = _rows(x)  # a view whenever x's layout allows; the kernel takes strides
    act, pre = _matmul(x2, fc_weight.t(), fc_bias, gelu=approximate, store_pre=save)
    y = _plain_matmul(act, proj_weight.t(), proj_bias)
    return y.view(*x.shape[:-1], proj_weight.shape[0]), pre, act


def _gelu_mlp_bwd(dy, x, fc_weight, proj_weight, pre, act, approximate, needs):
    """(dx, dW1, db1, dW2, db2); entries whose `needs` flag is False are None."""
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
    dy2 = _rows(dy)
    x2 = _rows(x)
    dx = dw1 = db1 = dw2 = db2 = None
    if need_dx or need_dw1 or need_db1:
        dpre, db_part = _gelu_grad_matmul(dy2, proj_weight, pre, approximate, need_db1)
        if need_dx:
            dx = _plain_matmul(dpre, fc_weight).view(x.shape)
        if need_dw1:
            dw1 = _plain_matmul(dpre.t(), x2, weight_grad=True)
        if need_db1:
            db1 = db_part.sum(0).to(x.dtype)
    if need_dw2:
        dw2 = _plain_matmul(dy2.t(), act, weight_grad=True)
    if need_db2:
        db2 = dy2.sum(0, dtype=acc_torch_dtype(dy.dtype)).to(x.dtype)
    return dx, dw1, db1, dw2, db2


# ---------------------------------------------------------------- custom ops and autograd

@torch.library.custom_op("tritongpt::gelu_mlp_fwd", mutates_args=())
def _gelu_mlp_fwd_op(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: Optional[torch.Tensor],
                     proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], approximate: str,
                     save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, pre, act = _gelu_mlp_fwd(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate, save)
    if not save:
        pre = act = None
    return y, or_empty(pre, x, x.dtype), or_empty(act, x, x.dtype)


@_gelu_mlp_fwd_op.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate, save):
    M, H = x.shape[:-1].numel(), fc_weight.shape[0]
    y = x.new_empty((*x.shape[:-1], proj_weight.shape[0]))
    saved = (M, H) if save else (0,)
    return y, x.new_empty(saved), x.new_empty(saved)


@torch.library.custom_op("tritongpt::gelu_mlp_bwd", mutates_args=())
def _gelu_mlp_bwd_op(dy: torch.Tensor, x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor,
                     pre: torch.Tensor, act: torch.Tensor, approximate: str, need_dx: bool, need_dw1: bool,
                     need_db1: bool, need_dw2: bool, need_db2: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    needs = (need_dx, need_dw1, need_db1, need_dw2, need_db2)
    grads = _gelu_mlp_bwd(dy, x, fc_weight, proj_weight, pre, act, approximate, needs)
    return tuple(or_empty(g, x, x.dtype) for g in grads)


@_gelu_mlp_bwd_op.register_fake
def _(dy, x, fc_weight, proj_weight, pre, act, approximate, need_dx, need_dw1, need_db1, need_dw2, need_db2):
    shapes = (x.shape, fc_weight.shape, fc_weight.shape[:1], proj_weight.shape, proj_weight.shape[:1])
    needs = (need_dx, need_dw1, need_db1, need_dw2, need_db2)
    return tuple(x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs))


def _setup_context(ctx, inputs, output):
    x, fc_weight, _, proj_weight, _, approximate, _ = inputs
    _, pre, act = output
    ctx.save_for_backward(x, fc_weight, proj_weight, pre, act)
    ctx.approximate = approximate


def _backward(ctx, dy, _dpre, _dact):
    x, fc_weight, proj_weight, pre, act = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    grads = _gelu_mlp_bwd_op(dy, x, fc_weight, proj_weight, pre, act, ctx.approximate, *needs)
    return *(g if n else None for g, n in zip(grads, needs)), None, None


_gelu_mlp_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public function

def _check_inputs(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate):
    check_tensor("x", x, min_ndim=1)
    C = x.shape[-1]
    check_tensor("fc_weight", fc_weight)
    if fc_weight.dim() != 2 or fc_weight.shape[1] != C or fc_weight.shape[0] == 0:
        raise ValueError(f"fc_weight must have shape (H, {C}) with H >= 1 to match x's last dimension, "
                         f"got {tuple(fc_weight.shape)}")
    H = fc_weight.shape[0]
    check_tensor("proj_weight", proj_weight)
    if proj_weight.dim() != 2 or proj_weight.shape[1] != H or proj_weight.shape[0] == 0:
        raise ValueError(f"proj_weight must have shape (O, {H}) with O >= 1 to match fc_weight, "
                         f"got {tuple(proj_weight.shape)}")
    for name, bias, n in (("fc_bias", fc_bias, H), ("proj_bias", proj_bias, proj_weight.shape[0])):
        if bias is None:
            continue
        check_tensor(name, bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(bias.shape)}")
    for name, t in (("fc_weight", fc_weight), ("fc_bias", fc_bias), ("proj_weight", proj_weight),
                    ("proj_bias", proj_bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype} (as F.linear requires), got {t.dtype}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    check_device({"x": x, "fc_weight": fc_weight, "fc_bias": fc_bias, "proj_weight": proj_weight,
                  "proj_bias": proj_bias})


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate="tanh"):
    """F.linear(F.gelu(F.linear(x, fc_weight, fc_bias), approximate=approximate), proj_weight, proj_bias).

    x: (..., C), any strides; fc_weight: (H, C) and proj_weight: (O, H) in nn.Linear layout;
    fc_bias (H,) and proj_bias (O,) or None; all one dtype in fp16, bf16, fp32 or fp64 (as F.linear
    requires). approximate: "tanh" (GPT-2's GELU, the default) or "none" (the exact erf form).
    Returns (..., O) in x's dtype; accumulation in fp32 (fp64 for fp64). Differentiable in every
    tensor (first order); bias gradients are summed in fp32, deterministically.
    Under torch.autocast the inputs are cast to the autocast dtype first, as F.linear would.
    Differs from PyTorch: the GELU is applied to the fp32 accumulator, not to h rounded to x's
    dtype, and dh is formed from an fp32 dg (both one rounding fewer than eager).
    """
    _check_inputs(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate)
    device_type = x.device.type
    tensors = (x, fc_weight, fc_bias, proj_weight, proj_bias)
    if torch.is_autocast_enabled(device_type):  # F.linear's autocast rule: compute in the low dtype
        low = torch.get_autocast_dtype(device_type)
        tensors = tuple(None if t is None else t.to(low) for t in tensors)
    with torch.autocast(device_type, enabled=False):
        return _gelu_mlp_fwd_op(*tensors, approximate, needs_grad(*tensors))[0]
