"""Plain-PyTorch definitions of every public op.

These are the specification: the tests' oracle, the benchmarks' baseline and the model's path when
a kernel is off. Each function has the same name and signature as its Triton counterpart in
`kernels` and is written with nothing but stock PyTorch ops, so it runs on any device and dtype.
"""
import torch
import torch.nn.functional as F


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dimension of x: (..., C)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def flash_attention(q, k, v, causal=True, sm_scale=None):
    """Scaled dot-product attention on (B, H, T, D) tensors.

    With causal=True and Tq < Tk the mask is aligned to the end: query i sees keys j <= i + Tk - Tq,
    which is what one decoding step against a KV cache needs. SDPA's `is_causal` aligns the mask to
    the start, so that case passes an explicit boolean mask instead.
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and tq != tk:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate="tanh"):
    """GPT-2's MLP: Linear -> GELU -> Linear, weights in nn.Linear layout (out, in).

    approximate: "tanh" (GPT-2's GELU) or "none" (the exact erf form), as F.gelu's keyword."""
    h = F.gelu(F.linear(x, fc_weight, fc_bias), approximate=approximate)
    return F.linear(h, proj_weight, proj_bias)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy of (N, V) logits against (N,) int64 targets, computed in fp32 (fp16
    and bf16 logits are upcast; fp64 stays fp64, so the oracle is exact in fp64)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0):
    """cross_entropy(x @ weight.T + bias, targets): the lm_head projection followed by the loss."""
    return cross_entropy(F.linear(x, weight, bias), targets, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing)
