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


def attention_mask(tq, tk, causal=True, window=None, doc_ids=None, device=None):
    """The boolean mask of flash_attention: True where query i may see key j.

    Shape (Tq, Tk), or (B, 1, Tq, Tk) with doc_ids. Causal aligns to the end: query i's last
    visible key is i + Tk - Tq. window keeps the `window` most recent of those, itself included
    (j > i + Tk - Tq - window). doc_ids (B, T) keeps the keys of the query's own document."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        mask = mask & (j <= i + (tk - tq))
    if window is not None:
        mask = mask & (j > i + (tk - tq) - window)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask


def flash_attention(q, k, v, causal=True, sm_scale=None, *, window=None, softcap=None, doc_ids=None):
    """Scaled dot-product attention on (B, H, Tq, D) queries and (B, H_kv, Tk, D) keys and values.

    - GQA/MQA: H % H_kv == 0 and query head h reads key/value head h // (H // H_kv).
    - causal: with Tq != Tk the mask is aligned to the end: query i sees keys j <= i + Tk - Tq, what
      one decoding step against a KV cache needs (SDPA's `is_causal` aligns it to the start).
    - window (causal only): query i sees only the `window` most recent of those keys, itself
      included (Mistral's sliding window).
    - softcap: the scaled scores s become softcap * tanh(s / softcap) before the softmax (Gemma 2).
    - doc_ids (B, T), Tq == Tk: query i sees key j only if doc_ids[b, i] == doc_ids[b, j].
    A query that sees no key gets an output of 0 (and no gradient).
    """
    tq, tk = q.shape[-2], k.shape[-2]
    group = q.shape[1] // k.shape[1]
    if group > 1:  # repeat each kv head for its group of query heads; autograd sums the group back
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    plain = window is None and doc_ids is None and not (causal and tq != tk)
    if softcap is None and plain:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)
    mask = attention_mask(tq, tk, causal, window, doc_ids, q.device)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sm_scale)
    return _softcapped_attention(q, k, v, mask, sm_scale, softcap)


def _softcapped_attention(q, k, v, mask, sm_scale, softcap):
    """Attention with capped scores, in the precision of a flash kernel: scores and softmax in fp32
    (fp64 for fp64 inputs), probabilities rounded to the inputs' dtype before the product with v."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    # softmax that gives 0, not nan, for a row with no visible key (the max is only a shift)
    m = s.amax(dim=-1, keepdim=True).detach()
    e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l == 0, 1.0, l)
    return p.to(q.dtype) @ v


def gelu_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, approximate="tanh"):
    """GPT-2's MLP: Linear -> GELU -> Linear, weights in nn.Linear layout (out, in).

    approximate: "tanh" (GPT-2's GELU) or "none" (the exact erf form), as F.gelu's keyword."""
    h = F.gelu(F.linear(x, fc_weight, fc_bias), approximate=approximate)
    return F.linear(h, proj_weight, proj_bias)


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None):
    """Softmax cross-entropy of (N, V) logits against (N,) int64 targets, computed in fp32.

    softcap: the logits become softcap * tanh(logits / softcap) first (Gemma 2). z_loss adds
    z_loss * logsumexp(logits)^2 to each kept row's loss (PaLM), reduced like the loss.
    fp64 logits stay fp64 (an exact oracle), the others compute in fp32."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if not z_loss and softcap is None:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        kept = targets != ignore_index
        loss = loss + torch.where(kept, z_loss * torch.logsumexp(logits, dim=-1).square(), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum()


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, softcap=None):
    """cross_entropy(x @ weight.T + bias, targets): the lm_head projection followed by the loss."""
    return cross_entropy(F.linear(x, weight, bias), targets, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                         softcap=softcap)
