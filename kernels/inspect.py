"""What the compiler made of each kernel: `python -m tritongpt.kernels.inspect [--arch sm_90|sm_80|all] [--json]`.

Compiles every Triton kernel of the project ahead of time for H100 (sm_90) and A100 (sm_80) (a
kernel the launchers run on Hopper only, for sm_90 alone), with no GPU and without running
anything, at the block sizes and warp counts the launchers' own heuristics pick (GPT-2 widths plus
the limits), and reads the cubin back with the cuobjdump shipped in the Triton wheel: registers per
thread, spill (local memory) and stack bytes, shared memory, the tensor-core instructions in the
SASS (HGMMA on sm_90, HMMA on sm_80).

Shared memory is reported as the per-block total: Triton's dynamic shared memory
(`CompiledKernel.metadata.shared`) plus the static shared memory the cubin declares (cuobjdump's
SHARED, e.g. the 1 KB ptxas reserves on sm_90); both parts are in the --json output.

To add a kernel file, append `Kernel(...)` entries to `kernel_table()`: the kernel's module and name,
a function that maps one config's parameters to a `Launch` (argument types, constexprs, num_warps,
taken from the launcher's heuristics), and the configs.
"""
import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Callable

ARCHS = {"sm_90": 90, "sm_80": 80}
# Most shared memory one block may opt in to: H100 (227 KB) and A100 (163 KB).
SHARED_LIMIT = {"sm_90": 232448, "sm_80": 166912}
# Per SM, for the occupancy column: shared memory (228 KB on H100, 164 KB on A100), and what both
# archs share: 64K registers in 4 sub-partitions, 64 warps (2048 threads), 32 blocks; registers
# go to warps in units of 256, shared memory to blocks in units of 128 bytes, and the driver
# reserves 1 KB of shared memory per block (the SHARED:1024 the sm_90 cubin declares).
SM_SHARED = {"sm_90": 233472, "sm_80": 167936}
SM_REGS, SM_SUBPARTITIONS, SM_WARPS, SM_BLOCKS = 65536, 4, 64, 32
REG_UNIT, SHARED_UNIT, RESERVED_SHARED = 256, 128, 1024
GPT2_WIDTHS = (768, 1024, 1280, 1600)  # n_embd of gpt2, gpt2-medium, gpt2-large, gpt2-xl
GPT2_ROWS = 16384  # B * T of a GPT-2 124M training step (B=16, T=1024)


@dataclass(frozen=True)
class Config:
    name: str
    params: dict
    hot_path: bool  # a shape the GPT-2 training step runs


@dataclass
class Launch:
    """One launch as the runtime would see it.

    args maps each non-constexpr argument to a pointer type ("*bf16"), "i32"/"fp32" for a scalar
    the runtime does not specialise, or a Python int (specialised like Triton does at launch: 1
    becomes a constexpr, multiples of 16 get a divisibility hint).
    """
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int = None


@dataclass(frozen=True)
class Kernel:
    module: str  # file under kernels/, without .py
    name: str  # the @triton.jit function in it
    launch: Callable  # (module, **config.params) -> Launch
    configs: tuple
    uses_mma: bool = False  # a tl.dot kernel: must show HGMMA on sm_90 at hot-path configs
    archs: tuple = tuple(ARCHS)  # where the launchers run it (the TMA-only kernels: sm_90)


# ---------------------------------------------------------------------------------------------
# The kernels. Every number comes from a launcher's heuristic, never from a table copied here.

def _width_configs(dtype="bf16", limits=()):
    """GPT-2 widths (hot path) and the given limit widths, for kernels whose launch depends on C."""
    return tuple(Config(f"C={C} {dtype}", {"C": C, "dtype": dtype}, C in GPT2_WIDTHS)
                 for C in GPT2_WIDTHS + tuple(limits))


def _layer_norm_fwd(ln, C, dtype):
    block_m, block_c, num_warps = ln._block_sizes(C)
    p = "*" + dtype
    return Launch(
        args=dict(X=p, W=p, B=p, Y=p, Mean="*fp32", Rstd="*fp32", stride_xm=C, stride_xc=1,
                  stride_ym=C, stride_w=1, stride_b=1, M=GPT2_ROWS, C=C, eps="fp32"),
        constexprs=dict(HAS_W=True, HAS_B=True, STORE_STATS=True, ACC=_tl().float32,
                        BLOCK_M=block_m, BLOCK_C=block_c),
        num_warps=num_warps)


def _layer_norm_bwd(ln, C, dtype):
    block_m, block_c, num_warps = ln._block_sizes(C)
    p = "*" + dtype
    return Launch(
        args=dict(X=p, W=p, DY=p, DX=p, Mean="*fp32", Rstd="*fp32", DWp="*fp32", DBp="*fp32",
                  stride_xm=C, stride_xc=1, stride_dym=C, stride_dyc=1, stride_dxm=C, stride_w=1,
                  M=GPT2_ROWS, C=C, ROWS_PER_PROG="i32"),
        constexprs=dict(HAS_W=True, NEED_DX=True, NEED_DW=True, NEED_DB=True, ACC=_tl().float32,
                        BLOCK_M=block_m, BLOCK_C=block_c, NUM_STAGES=ln.BWD_STAGES),
        num_warps=num_warps)


def _layer_norm_bwd_reduce(ln, C, dtype):
    """The sum of the backward's partials (one row per program of its grid on an H100), cast to
    the parameters' dtype (GPT-2's: fp32)."""
    return Launch(
        args=dict(DWp="*fp32", DBp="*fp32", DW="*fp32", DB="*fp32", P="i32", C=C),
        constexprs=dict(NEED_DW=True, NEED_DB=True, ACC=_tl().float32,
                        BLOCK_P=ln.REDUCE_BLOCK_P, BLOCK_N=ln.REDUCE_BLOCK_N),
        num_warps=4)


def _ce_args(V, dtype, names):
    """Arguments shared by the cross-entropy kernels: logits rows of V, int64 targets, fp32 stats."""
    p = "*" + dtype
    common = dict(X=p, T="*i64", Loss="*fp32", Stats="*fp32", G=p, Scale="*fp32",
                  stride_xm=V, stride_xv=1, stride_t=1, stride_gm=V, stride_gv=1, stride_s="i32",
                  V=V, ignore_index="i32", smoothing="fp64", z_loss="fp64", softcap="fp64")
    return {name: common[name] for name in names}


def _cross_entropy_fwd(ce, V, dtype):
    """The forward as linear_cross_entropy launches it: statistics and the gradient in place."""
    block_v, num_warps = ce._block_v(V)
    names = ("X", "T", "Loss", "Stats", "G", "Scale", "stride_xm", "stride_xv", "stride_t",
             "stride_gm", "stride_gv", "stride_s", "V", "ignore_index", "smoothing", "z_loss", "softcap")
    return Launch(args=_ce_args(V, dtype, names),
                  constexprs=dict(STORE_STATS=True, WRITE_GRAD=True, HAS_SMOOTHING=False, SOFTCAP=False,
                                  Z_LOSS=False, ALIGN=True, VEC=8, ACC=_tl().float32, BLOCK_V=block_v),
                  num_warps=num_warps)


def _cross_entropy_bwd(ce, V, dtype):
    block_v, num_warps = ce._block_v(V)
    names = ("X", "T", "Stats", "G", "Scale", "stride_xm", "stride_xv", "stride_t", "stride_gm",
             "stride_gv", "stride_s", "V", "ignore_index", "smoothing", "z_loss", "softcap")
    return Launch(args=_ce_args(V, dtype, names),
                  constexprs=dict(SOFTCAP=False, Z_LOSS=False, ALIGN=True, VEC=8, ACC=_tl().float32,
                                  BLOCK_V=block_v),
                  num_warps=num_warps)


ATTN_T, ATTN_H = 1024, 12  # GPT-2's context and heads; causal, bf16


def _attention_strides(D):
    """Strides (b, h, t, d) of q, k, v as the model passes them (views of the fused (B, T, 3C)
    projection) and of the launchers' outputs and gradients ((B, T, H, D) memory)."""
    C = ATTN_H * D
    return (ATTN_T * 3 * C, D, 3 * C, 1), (ATTN_T * C, D, C, 1)


# The launcher's specialisations beyond plain causal attention: GQA (12 query heads on 3 kv heads),
# a sliding window, softcapped scores, document masking (the model's doc_mask). Scalar values as
# the launcher passes them: GROUP = 1 and window = 0 when the feature is off.
ATTN_FEATURES = {
    "plain": dict(GROUP=1),
    "gqa": dict(GROUP=4),
    "window": dict(GROUP=1, HAS_WINDOW=True),
    "softcap": dict(GROUP=1, SOFTCAP=True),
    "docs": dict(GROUP=1, HAS_DOCS=True),
}


def _attention_launch(at, kind, D, dtype, pointers, strided, features):
    """A Launch of one attention kernel at the first (expected best) of its CUDA configs.
    pointers: (name, type) pairs; strided: (stride prefix, "in" or "out") in argument order;
    features: a key of ATTN_FEATURES."""
    feature = ATTN_FEATURES[features]
    heavy = at.heavy_features(kind, softcap=1.0 if feature.get("SOFTCAP") else None,
                              doc_ids=True if feature.get("HAS_DOCS") else None, group=feature["GROUP"])
    bm, bn, warps, stages = at.cuda_configs(kind, D, heavy=heavy)[0]
    layouts = dict(zip(("in", "out"), _attention_strides(D)))
    args = dict(pointers)
    for prefix, layout in strided:
        args.update(zip((f"{prefix}b", f"{prefix}h", f"{prefix}m" if prefix in ("stride_q", "stride_o",
                         "stride_do", "stride_dq") else f"{prefix}n", f"{prefix}d"), layouts[layout]))
    docs = feature.get("HAS_DOCS", False)
    window = feature.get("HAS_WINDOW", False)
    args.update(Docs="*i64" if docs else None, stride_docb=ATTN_T if docs else 0, H=ATTN_H,
                GROUP=feature["GROUP"], Tq=ATTN_T, Tk=ATTN_T, qk_scale="fp32", cap="fp32",
                window="i32" if window else 0)
    if kind != "fwd":
        args["sm_scale"] = "fp32"
    constexprs = dict(CAUSAL=True, HAS_WINDOW=window, SOFTCAP=feature.get("SOFTCAP", False), HAS_DOCS=docs,
                      HEAD_D=D, UPCAST=False, PREC="tf32", ACC=_tl().float32, BLOCK_M=bm, BLOCK_N=bn)
    if kind == "dkdv":
        constexprs["EVEN_M"] = True
    if kind == "fwd":  # keys and values through TMA, as the launcher passes bf16 (B, H, T, D) views
        args["Kd"] = args["Vd"] = f"tensordesc<{dtype}[1,1,{bn},{D}]>"
        constexprs["TMA"] = True
    return Launch(args=args, constexprs=constexprs, num_warps=warps, num_stages=stages)


def _attention_fwd(at, D, dtype, features="plain"):
    p = "*" + dtype
    return _attention_launch(at, "fwd", D, dtype, (("Q", p), ("K", p), ("V", p), ("O", p), ("Stats", "*fp32")),
                             (("stride_q", "in"), ("stride_k", "in"), ("stride_v", "in"), ("stride_o", "out")),
                             features)


def _attention_bwd_dkdv(at, D, dtype, features="plain"):
    p = "*" + dtype
    return _attention_launch(
        at, "dkdv", D, dtype,
        (("Q", p), ("K", p), ("V", p), ("DO", p), ("Stats", "*fp32"), ("Delta", "*fp32"), ("DK", p), ("DV", p)),
        (("stride_q", "in"), ("stride_k", "in"), ("stride_v", "in"), ("stride_do", "out"), ("stride_dk", "out")),
        features)


def _attention_bwd_dq(at, D, dtype, features="plain"):
    p = "*" + dtype
    return _attention_launch(
        at, "dq", D, dtype,
        (("Q", p), ("K", p), ("V", p), ("DO", p), ("O", p), ("Stats", "*fp32"), ("Delta", "*fp32"), ("DQ", p)),
        (("stride_q", "in"), ("stride_k", "in"), ("stride_v", "in"), ("stride_do", "out"), ("stride_o", "out"),
         ("stride_dq", "out")),
        features)


def _mlp_shapes(kind, C):
    """(M, N, K) of one MLP matmul at GPT-2's rows and width C (hidden 4C), as the launchers run it:
    fc = x W1^T (+ GELU), proj = g W2^T, dw = dh^T x (weight gradients, K = rows, split over programs),
    bwd = (dy W2) * gelu'(h)."""
    H = 4 * C
    return {"fc": (GPT2_ROWS, H, C), "proj": (GPT2_ROWS, C, H), "dw": (H, C, GPT2_ROWS),
            "bwd": (GPT2_ROWS, H, C)}[kind]


_MLP_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _mlp_constexprs(mlp, config, dtype):
    dot = mlp._dot_options(getattr(_torch(), _MLP_DTYPES[dtype]), _torch().device("cuda"))
    return dict(dot, **{k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})


def _mlp_stages(mlp, config, dtype):
    """The config's pipeline depth after the launcher's shared-memory pruning (fewer for fp32)."""
    import triton
    tile = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    first = _torch().empty(0, dtype=getattr(_torch(), _MLP_DTYPES[dtype]))
    fitted = mlp._fit_shared_memory([triton.Config(tile, num_warps=config["num_warps"],
                                                   num_stages=config["num_stages"])], {"A": first})
    return fitted[0].num_stages


def _mlp_fwd(mlp, kind, C, tune, dtype):
    """_mlp_fwd_kernel in one of its three uses, at autotune config number `tune` of that use's list."""
    config = mlp.gpu_configs(epilogue=kind == "fc")[tune]
    M, N, K = _mlp_shapes(kind, C)
    p = "*" + dtype
    dw = kind == "dw"
    # dw splits K (the rows) in two at GPT-2 124M (_split_k on 132 SMs).
    # fc reads x (M, C) and W1^T (W1 is (H, C)); proj g (M, H) and W2^T; dw dh^T (dh is (rows, H)) and x
    stride_am, stride_ak = (1, M) if dw else (K, 1)
    stride_bk, stride_bn = (N, 1) if dw else (1, K)
    return Launch(
        args=dict(A=p, B=p, Bias=None if dw else p, Out="*fp32" if dw else p, Pre=p if kind == "fc" else None,
                  M=M, N=N, K=K, K_PER_SPLIT=K // 2 if dw else K, M_KEY=M, K_KEY=K, stride_am=stride_am, stride_ak=stride_ak,
                  stride_bk=stride_bk, stride_bn=stride_bn, stride_om=N, stride_on=1, stride_os=M * N,
                  stride_bias=0 if dw else 1),  # a contiguous bias, as nn.Linear's
        constexprs=dict(HAS_BIAS=not dw, GELU=kind == "fc", STORE_PRE=kind == "fc", APPROX_TANH=True,
                        **_mlp_constexprs(mlp, config, dtype)),
        num_warps=config["num_warps"], num_stages=_mlp_stages(mlp, config, dtype))


def _mlp_bwd(mlp, C, tune, dtype):
    config = mlp.gpu_configs(epilogue=True)[tune]
    M, N, K = _mlp_shapes("bwd", C)
    p = "*" + dtype
    return Launch(
        args=dict(DY=p, W2=p, Pre=p, DPre=p, DBp="*fp32", M=M, N=N, K=K, M_KEY=M, stride_dym=K, stride_dyk=1,
                  stride_wk=N, stride_wn=1, stride_pm=N, stride_pn=1),
        constexprs=dict(NEED_DB=True, APPROX_TANH=True, **_mlp_constexprs(mlp, config, dtype)),
        num_warps=config["num_warps"], num_stages=_mlp_stages(mlp, config, dtype))


def _mlp_tma(mlp, kind, C, tune, dtype):
    """_mlp_epilogue_tma_kernel at GPT-2's shapes: fc (+ bias, GELU, both outputs stored) reads W1
    as nn.Linear keeps it, (N, K); the backward reads W2 as (K, N) and h through pointers."""
    config = mlp.tma_configs()[tune]
    M, N, K = _mlp_shapes(kind, C)
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    bwd = kind == "bwd"
    tile = f"tensordesc<{dtype}[{bm},{bn}]>"
    args = dict(Ad=f"tensordesc<{dtype}[{bm},{bk}]>",
                Bd=f"tensordesc<{dtype}[{bk},{bn}]>" if bwd else f"tensordesc<{dtype}[{bn},{bk}]>",
                Bias=None if bwd else "*" + dtype, Pre="*" + dtype if bwd else None, Pd=None if bwd else tile,
                Od=tile, DBp="*fp32" if bwd else None, M=M, N=N, K=K, M_KEY=M, stride_bias=0 if bwd else 1,
                stride_pm=N if bwd else 0, stride_pn=1 if bwd else 0)
    constexprs = dict(BACKWARD=bwd, B_KN=bwd, HAS_BIAS=not bwd, STORE_PRE=not bwd, NEED_DB=bwd, APPROX_TANH=True,
                      PROGRAMS_PER_SM=config["PROGRAMS_PER_SM"], **_mlp_constexprs(mlp, config, dtype))
    return Launch(args=args, constexprs=constexprs, num_warps=config["num_warps"], num_stages=config["num_stages"])


def _mlp_tma_configs():
    n = len(_module("mlp").tma_configs())
    return tuple(Config(f"{kind} C=768 tune{i} bf16", {"kind": kind, "C": 768, "tune": i, "dtype": "bf16"}, True)
                 for kind in ("fc", "bwd") for i in range(n))


def _mlp_configs(kinds):
    """Every autotune config of kernels.mlp (the GPU's lists) for each use, at GPT-2 124M's shapes.
    fc and bwd have a GELU epilogue and their own list."""
    configs = []
    for kind in kinds:
        n = len(_module("mlp").gpu_configs(epilogue=kind in ("fc", "bwd")))
        kind_param = {} if kind == "bwd" else {"kind": kind}
        configs += [Config(f"{kind} C=768 tune{i} bf16", {**kind_param, "C": 768, "tune": i, "dtype": "bf16"}, True)
                    for i in range(n)]
    return tuple(configs)


def kernel_table():
    """Every kernel of the project with the configs to compile it at."""
    ln_configs = _width_configs(limits=(8192, _module("layer_norm").MAX_C))
    # GPT-2's vocabulary, and the padded 50304 its training uses.
    ce_configs = tuple(Config(f"V={V} bf16", {"V": V, "dtype": "bf16"}, True) for V in (50257, 50304))
    # Causal, T = 1024: GPT-2's head dim (hot path) and D = 128 (bigger models, the limit).
    attn_configs = tuple(Config(f"T={ATTN_T} D={D} causal bf16", {"D": D, "dtype": "bf16"}, D == 64)
                         for D in (64, 128))
    # The other specialisations (GQA, window, softcap, documents) at GPT-2's head dim.
    attn_feature_configs = attn_configs + tuple(
        Config(f"T={ATTN_T} D=64 causal {f} bf16", {"D": 64, "dtype": "bf16", "features": f}, False)
        for f in ATTN_FEATURES if f != "plain")  # off by default: not on the GPT-2 hot path
    return [
        Kernel("layer_norm", "_layer_norm_fwd_kernel", _layer_norm_fwd, ln_configs),
        Kernel("layer_norm", "_layer_norm_bwd_kernel", _layer_norm_bwd, ln_configs),
        Kernel("layer_norm", "_layer_norm_bwd_reduce_kernel", _layer_norm_bwd_reduce, ln_configs),
        Kernel("cross_entropy", "_cross_entropy_fwd_kernel", _cross_entropy_fwd, ce_configs),
        Kernel("cross_entropy", "_cross_entropy_bwd_kernel", _cross_entropy_bwd, ce_configs),
        Kernel("attention", "_attention_fwd_kernel", _attention_fwd, attn_feature_configs, uses_mma=True),
        Kernel("attention", "_attention_bwd_dkdv_kernel", _attention_bwd_dkdv, attn_feature_configs, uses_mma=True),
        Kernel("attention", "_attention_bwd_dq_kernel", _attention_bwd_dq, attn_feature_configs, uses_mma=True),
        Kernel("mlp", "_mlp_fwd_kernel", _mlp_fwd, _mlp_configs(("fc", "proj", "dw")), uses_mma=True),
        Kernel("mlp", "_mlp_bwd_kernel", _mlp_bwd, _mlp_configs(("bwd",)), uses_mma=True),
        Kernel("mlp", "_mlp_epilogue_tma_kernel", _mlp_tma, _mlp_tma_configs(), uses_mma=True, archs=("sm_90",)),
    ]


# ---------------------------------------------------------------------------------------------
# Bytes and FLOPs per op at GPT-2 124M, from the launchers' own plans (chunk counts, grids, tiles),
# against the least the op must move or do. Global-memory bytes, counting each launch's reads and
# writes once (tile re-reads of one launch are assumed to hit L2); bf16 tensors, fp32 statistics.

GPT2 = dict(N=GPT2_ROWS, C=768, V=50257, B=16, H=ATTN_H, T=ATTN_T, D=64)
H100_SMS = 132  # the persistent grids' size on an H100 SXM
BF16, FP32 = 2, 4


def _op(op, launches, bytes_, min_bytes, flops=None, min_flops=None):
    return dict(op=op, launches=launches, bytes=bytes_, min_bytes=min_bytes,
                bytes_ratio=round(bytes_ / min_bytes, 3) if bytes_ else None,
                flops=flops, min_flops=min_flops,
                flops_ratio=round(flops / min_flops, 3) if flops else None)


def layer_norm_traffic(N, C, sms=H100_SMS):
    """Forward: x in, y out, w and b, the fp32 mean and rstd saved. Backward (two launches): the row
    kernel reads x, dy, w, mean, rstd and writes dx and one row of fp32 partials of dw and db per
    program; the reduction reads the partials and writes dw and db in the parameters' dtype.
    Minimum: the tensors once."""
    ln = _module("layer_norm")
    programs = ln._bwd_programs(N, ln._block_sizes(C)[0], sms)[0]
    fwd = _op("layer_norm fwd", 1, 2 * N * C * BF16 + 2 * C * BF16 + 2 * N * FP32,
              2 * N * C * BF16 + 2 * C * BF16)
    partials = 2 * programs * C * FP32
    tensors = 3 * N * C * BF16 + C * BF16 + 2 * N * FP32 + 2 * C * BF16  # x, dy, dx, w, mean, rstd, dw, db
    bwd = _op("layer_norm bwd", 2, tensors + 2 * partials, tensors)  # partials written, then read
    return [fwd, bwd]


def cross_entropy_traffic(N, V):
    """cross_entropy(logits) forward + backward: the forward reads the logits, the backward reads
    them again and writes the gradient. Minimum: read once, gradient written once."""
    stats = N * (FP32 + 2 * FP32 + 8)  # loss, (m, log_s), int64 targets
    return [_op("cross_entropy fwd+bwd", 2, 3 * N * V * BF16 + 2 * stats, 2 * N * V * BF16 + stats)]


def linear_cross_entropy_traffic(N, C, V):
    """linear_cross_entropy, reduction "mean", gradients of x and weight (GPT-2's lm_head: no bias).
    Each chunk of R rows: logits = x_c W^T, the kernel turns them into their gradient g in place,
    dx_c = g W, dW += g^T x_c accumulated in place in one fp32 buffer (the first chunk writes it);
    the backward scales dx and casts dW with the upstream gradient folded in (one pass each).
    Whole op minimum: x, W, targets read once, dx, dW written once. The dW row: the accumulator's
    traffic against the least a chunked fp32 accumulation moves (each chunk writes it, each later
    chunk reads it back, one scaled cast at the end)."""
    rows = _module("cross_entropy").chunk_rows(N, V, BF16)
    chunks = triton_cdiv(N, rows)
    VC = V * C
    logits = 5 * N * V * BF16  # mm writes, the kernel reads and writes, dx and dW matmuls read
    x_reads = 2 * N * C * BF16 + chunks * 2 * VC * BF16  # x_c twice, W twice per chunk
    dx = N * C * BF16 + 2 * N * C * BF16  # written per chunk, then scaled out of place
    dw_min = chunks * VC * FP32 + (chunks - 1) * VC * FP32 + VC * (FP32 + BF16)
    dw = dw_min  # in place from the first chunk, the upstream gradient folded into the cast
    dw_launches = chunks + 1
    small = N * (8 + 3 * FP32)
    flops = 3 * 2 * N * V * C  # logits, dx, dW
    return [_op("linear_cross_entropy fwd+bwd", 3 * chunks + dw_launches + 1,
                logits + x_reads + dx + dw + small, 2 * N * C * BF16 + 2 * VC * BF16 + small, flops, flops),
            _op("linear_cross_entropy dW", dw_launches, dw, dw_min)]


def _causal_tiles(T, block_m, block_n):
    """(BLOCK_M x BLOCK_N) tiles a causal kernel computes: query block i sees key blocks up to its
    last row (masked tiles on the diagonal are computed whole)."""
    return sum(triton_cdiv(min(T, (i + 1) * block_m), block_n) for i in range(triton_cdiv(T, block_m)))


def attention_traffic(B, H, T, D):
    """Causal attention: FLOPs of the tiles the launch plan computes (first config of each list)
    against 4 D per visible (query, key) pair forward, 10 D backward (five matmuls, recompute
    included). Bytes: each tile's K and V (or Q, dO) reads counted, against q, k, v, o once."""
    at = _module("attention")
    pairs = B * H * T * (T + 1) // 2
    io = B * H * T * D * BF16
    bm, bn = at.cuda_configs("fwd", D)[0][:2]
    tiles = B * H * _causal_tiles(T, bm, bn)
    fwd = _op("attention fwd", 1, 2 * io + tiles * 2 * bn * D * BF16 + B * H * T * FP32, 4 * io + B * H * T * FP32,
              tiles * 4 * bm * bn * D, pairs * 4 * D)
    bm, bn = at.cuda_configs("dkdv", D)[0][:2]
    kv_tiles = B * H * _causal_tiles(T, bn, bm)  # walks query blocks (BLOCK_M) for each key block (BLOCK_N)
    bm2, bn2 = at.cuda_configs("dq", D)[0][:2]
    q_tiles = B * H * _causal_tiles(T, bm2, bn2)
    stats, delta = 2 * B * H * T * FP32, B * H * T * FP32
    bwd = _op("attention bwd", 2,
              # dq: q, dO, o, m and 1/l in, k and v per tile, delta and dq out
              3 * io + stats + q_tiles * 2 * bn2 * D * BF16 + delta + io
              # dkdv: k, v, m, 1/l and delta in, q and dO per tile, dk and dv out
              + 2 * io + stats + delta + kv_tiles * 2 * bm * D * BF16 + 2 * io,
              8 * io + stats,
              kv_tiles * 8 * bm * bn * D + q_tiles * 6 * bm2 * bn2 * D, pairs * 10 * D)
    return [fwd, bwd]


def mlp_traffic(N, C):
    """GELU MLP (hidden 4C): FLOPs of its six matmuls (fc, proj, their input and weight gradients)
    against the same, as nothing is recomputed. Bytes are not modelled yet (its launch plan has
    autotuned split-K, bias partials and casts): None."""
    flops = 6 * 2 * N * C * 4 * C
    return [_op("gelu_mlp fwd+bwd", None, None, None, flops, flops)]


def op_table(shape=GPT2):
    """Every op's row at GPT-2 124M (or another shape dict with the same keys)."""
    N, C, V = shape["N"], shape["C"], shape["V"]
    return (layer_norm_traffic(N, C) + attention_traffic(shape["B"], shape["H"], shape["T"], shape["D"])
            + mlp_traffic(N, C) + cross_entropy_traffic(N, V) + linear_cross_entropy_traffic(N, C, V))


def triton_cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Compiling and reading the cubin.

def _tl():
    import triton.language as tl
    return tl


def _torch():
    import torch
    return torch


def _module(name):
    # importlib, not `from tritongpt.kernels import layer_norm`: the package exports a function by that name
    return importlib.import_module(f"tritongpt.kernels.{name}")


def specialize(fn, launch):
    """(signature, constexprs, attrs) for ASTSource, the way Triton's runtime specialises a launch."""
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(fn.arg_names):
        value = launch.args.get(name)
        if name in launch.constexprs:
            signature[name] = "constexpr"
        elif value is None and name in launch.args:  # a None argument (an absent bias): constexpr None
            signature[name], constexprs[name] = "constexpr", None
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):  # torch allocations are at least 16-byte aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{fn.__name__}: no type for argument {name!r} (got {value!r})")
    return signature, constexprs, attrs


def cuobjdump_path():
    """The cuobjdump shipped in the Triton wheel (triton/backends/nvidia/bin), else one on PATH."""
    import triton.backends.nvidia
    path = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    path = path if os.path.exists(path) else shutil.which("cuobjdump")
    if not path:
        raise RuntimeError("cuobjdump not found in the Triton wheel or on PATH")
    return path


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_GLOBAL = ("LDG", "STG", "LDGSTS")  # global loads, stores, and the sm_80 async copy global -> shared
_WIDTH = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}  # else 32 bits


def sass_instructions(sass):
    """[(address, opcode, operands)] of every instruction in a cuobjdump -sass listing."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _INSTRUCTION.findall(sass)]


def innermost_loops(instructions):
    """[(first, last)] addresses of each innermost loop. A loop is a branch to an earlier address
    (its back-edge; back-edges to one head merge); innermost: it holds no other loop. The
    `BRA <itself>` that ends every kernel is padding, not a loop."""
    ends = {}
    for address, op, rest in instructions:
        if op.split(".")[0] == "BRA":
            target = int(rest.split()[-1], 16)
            if target < address:
                ends[target] = max(address, ends.get(target, 0))
    loops = sorted(ends.items())
    return [(a, b) for a, b in loops if not any((a, b) != (c, d) and a <= c and d <= b for c, d in loops)]


def loads_after_drain(instructions):
    """Global loads after the first wait that drains every wgmma (WARPGROUP.DEPBAR.LE gsb0, 0x0):
    in a GEMM, data its epilogue fetches only once the accumulation is done, so their DRAM latency
    is exposed. None where nothing drains wgmmas (sm_80, kernels without dots)."""
    drain = next((i for i, (_, op, rest) in enumerate(instructions)
                  if op == "WARPGROUP.DEPBAR.LE" and rest.replace(" ", "") == "gsb0,0x0"), None)
    if drain is None:
        return None
    return sum(op.split(".")[0] == "LDG" for _, op, _ in instructions[drain:])


def sass_facts(sass):
    """What the SASS says about speed: per innermost loop its instructions and global loads, the
    global accesses by width (static counts), and the TMA (bulk tensor copy) instructions."""
    instructions = sass_instructions(sass)
    loops = innermost_loops(instructions)
    widths = {}
    for _, op, _ in instructions:
        parts = op.split(".")
        if parts[0] in _GLOBAL:
            width = next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 32)
            widths[width] = widths.get(width, 0) + 1
    inside = [[op for address, op, _ in instructions if a <= address <= b] for a, b in loops]
    total = sum(widths.values())
    return dict(loop_insts=[len(body) for body in inside],
                loop_loads=[sum(op.split(".")[0] in ("LDG", "LDGSTS") for op in body) for body in inside],
                global_widths={str(w): n for w, n in sorted(widths.items(), reverse=True)},
                g128_share=round(widths.get(128, 0) / total, 3) if total else None,
                tma=sum(op.startswith(("UTMA", "UBLKCP")) for _, op, _ in instructions),
                late_loads=loads_after_drain(instructions))


def resident_warps(arch, regs, num_warps, triton_shared):
    """Warps of one kernel resident per SM: the fewest blocks any of registers, warps, blocks and
    shared memory allows, times the warps per block (the CUDA occupancy calculator's rules)."""
    regs_per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    # registers are split among the 4 sub-partitions; a warp's registers live in one of them
    warps_by_regs = (SM_REGS // SM_SUBPARTITIONS // regs_per_warp) * SM_SUBPARTITIONS
    block_shared = -(-(triton_shared + RESERVED_SHARED) // SHARED_UNIT) * SHARED_UNIT
    blocks = min(warps_by_regs // num_warps, SM_WARPS // num_warps, SM_BLOCKS, SM_SHARED[arch] // block_shared)
    return blocks * num_warps


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_MMA = re.compile(r"\b[A-Z]*MMA\.[\w.]+")  # HGMMA.64x128x16.F32.BF16, HMMA.16816.F32.BF16, ...


def read_cubin(cubin):
    """Registers, stack, static shared, local bytes and the distinct tensor-core instructions."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", "-sass", path],
                             capture_output=True, text=True, check=True).stdout
    regs, stack, shared, local = map(int, _RESOURCES.search(out).groups())
    mma = sorted(set(_MMA.findall(out)))
    return dict(regs=regs, stack_bytes=stack, static_shared_bytes=shared, spill_bytes=local,
                mma=",".join(mma) if mma else "none", **sass_facts(out))


def inspect_one(kernel, config, arch):
    """Compile one kernel at one config for one arch and report what the cubin says."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _module(kernel.module)
    fn = getattr(module, kernel.name)
    launch = kernel.launch(module, **config.params)
    if launch.constexprs.get("TMA") and ARCHS[arch] < 90:  # as the launcher: TMA on Hopper only
        launch = replace(launch, args=dict(launch.args, Kd=None, Vd=None),
                                     constexprs=dict(launch.constexprs, TMA=False))
    signature, constexprs, attrs = specialize(fn, launch)
    options = {"num_warps": launch.num_warps}
    if launch.num_stages is not None:
        options["num_stages"] = launch.num_stages
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                              target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    usage = read_cubin(compiled.asm["cubin"])
    triton_shared = compiled.metadata.shared
    return dict(kernel=kernel.name, config=config.name, arch=arch, hot_path=config.hot_path,
                num_warps=compiled.metadata.num_warps, regs=usage["regs"],
                spill_bytes=usage["spill_bytes"], stack_bytes=usage["stack_bytes"],
                shared_bytes=triton_shared + usage["static_shared_bytes"],
                triton_shared_bytes=triton_shared, static_shared_bytes=usage["static_shared_bytes"],
                shared_limit_bytes=SHARED_LIMIT[arch], mma=usage["mma"], uses_mma=kernel.uses_mma,
                warps_per_sm=resident_warps(arch, usage["regs"], compiled.metadata.num_warps, triton_shared),
                **{k: usage[k] for k in ("loop_insts", "loop_loads", "global_widths", "g128_share", "tma",
                                         "late_loads")})


def inspect_all(archs):
    return [inspect_one(k, c, a) for k in kernel_table() for c in k.configs for a in archs if a in k.archs]


# ---------------------------------------------------------------------------------------------
# Command line.

_COLUMNS = (("kernel", "kernel"), ("config", "config"), ("arch", "arch"), ("hot", "hot_path"),
            ("warps", "num_warps"), ("regs", "regs"), ("spill", "spill_bytes"),
            ("stack", "stack_bytes"), ("shared", "shared_bytes"), ("warps/SM", "warps_per_sm"),
            ("loop insts", "loop_insts"), ("loop loads", "loop_loads"), ("128-bit", "g128_share"),
            ("tma", "tma"), ("late loads", "late_loads"), ("mma", "mma"))
_OP_COLUMNS = (("op (GPT-2 124M, bf16)", "op"), ("launches", "launches"), ("MB", "bytes"), ("min MB", "min_bytes"),
               ("x min", "bytes_ratio"), ("GFLOP", "flops"), ("min GFLOP", "min_flops"), ("x min", "flops_ratio"))


def _cell(value, key):
    if isinstance(value, bool):
        return "yes" if value else ""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if key in ("bytes", "min_bytes"):
        return f"{value / 1e6:.1f}"
    if key in ("flops", "min_flops"):
        return f"{value / 1e9:.1f}"
    return str(value)


def _text_table(columns, rows):
    table = [[h for h, _ in columns]] + [[_cell(r[k], k) for _, k in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(rows, ops):
    lines = _text_table(_COLUMNS, rows)
    lines.append("")
    lines.append("regs: per thread; spill, stack: bytes per thread (local memory); shared: bytes per block, "
                 "Triton's dynamic shared + the cubin's static shared (limit "
                 + ", ".join(f"{a} {b}" for a, b in SHARED_LIMIT.items()) + "); hot: on the GPT-2 path; "
                 "warps/SM: resident warps per SM (registers, warps, shared); loop insts, loop loads: SASS "
                 "instructions and global loads in each innermost loop; 128-bit: share of the global "
                 "loads and stores that move 128 bits; tma: bulk tensor copy instructions; late loads: global "
                 "loads after the first wait that drains every wgmma (their latency follows the accumulation). "
                 "Compile-time facts, not speed.")
    lines.append("")
    lines += _text_table(_OP_COLUMNS, ops)
    lines.append("")
    lines.append("Global-memory bytes and FLOPs one op moves and does at GPT-2 124M (B*T = 16384, C = 768, "
                 "V = 50257, H = 12, D = 64, T = 1024) from the launchers' plans, against the least it must; "
                 "a model, not a measurement (see README, Reading the inspect report).")
    return "\n".join(lines)


def _clean_env():
    """This environment without TRITON_INTERPRET (so triton.jit gives compilable kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m tritongpt.kernels.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=[*ARCHS, "all"], default="all")
    parser.add_argument("--json", action="store_true",
                        help='print {"kernels": [...], "ops": [...]} as JSON instead of tables')
    args = parser.parse_args(argv)

    if "TRITON_INTERPRET" in os.environ:
        # triton.jit gave interpreter objects, which cannot compile: do it in a clean process
        return subprocess.run([sys.executable, "-m", "tritongpt.kernels.inspect", *argv], env=_clean_env()).returncode
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default; silences its warning

    rows = inspect_all(list(ARCHS) if args.arch == "all" else [args.arch])
    ops = op_table()
    print(json.dumps(dict(kernels=rows, ops=ops), indent=1) if args.json else format_table(rows, ops))
    return 0


if __name__ == "__main__":
    sys.exit(main())
