"""The flash_attention kernel as a transformers attention implementation, named "tritongpt".

    import tritongpt.kernels.hf                     # registers "tritongpt" with transformers
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="tritongpt")
    model.set_attn_implementation("tritongpt")     # or switch a loaded model

This goes through transformers' own extension points (AttentionInterface for the attention
function, AttentionMaskInterface for the mask builder), so transformers keeps its projections,
positional embeddings, cache updates and mask building; `attention` below receives q, k, v as
(B, H, T, D) and the mask made for this call. The mask builder registered for the name is
transformers' SDPA one: a mask is None exactly where SDPA itself would rely on is_causal (no
padding, no packed sequences, no sliding window, queries == keys or one query).

`attention` runs the kernel only where the call means what the kernel computes:
- no mask and causal self-attention over as many keys as queries (training, a prefill);
- no mask and one query against any number of keys (a decoding step against the cache);
- no mask and non-causal attention (cross-attention, an encoder);
- a boolean mask that is, in every batch row, the kernel's end-aligned causal mask cut to a
  sliding window (an unpadded Mistral-style model: transformers builds that mask, and the kernel
  runs it as its `window`, skipping the key tiles outside it); the mask is compared in full, once
  per mask tensor, so a padded or packed batch never passes for one;
and hands every other call, unchanged, to transformers' sdpa_attention_forward: any other mask
(padding, packing), dropout > 0 (training with attn_pdrop), output_attentions, a head mask, a
position bias, any keyword it does not know, a head dimension or dtype the kernel lacks. Fewer
key/value heads than query heads (GQA/MQA) go to the kernel as they are, and a `softcap` keyword
(Gemma 2's attention logit softcapping, which transformers' sdpa refuses) is the kernel's softcap.
Under torch.compile masks are not read (that would break the graph): masked calls run sdpa there.
Supported transformers: 4.55 (the first whose GPT-2 builds its masks through the mask interface)
and newer; older releases are refused when registering.
"""
import weakref

import torch

from . import attention as _attention
from .nn import op
from .reference import attention_mask as _kernel_mask

NAME = "tritongpt"
MIN_TRANSFORMERS = (4, 55)
# Keywords transformers passes that do not change the attention's maths once the mask is built
# (position_ids only matter for packed sequences, which get an explicit mask; a sliding window
# only when it is shorter than the keys, and then transformers builds a mask, read below).
KNOWN_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "return_dict", "output_hidden_states",
                          "output_attentions", "head_mask", "is_causal", "sliding_window", "softcap"})


def _version(text):
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def check_version(version):
    """Raise ImportError unless transformers `version` is one this integration supports."""
    if _version(version) < MIN_TRANSFORMERS:
        raise ImportError(f"tritongpt's transformers attention needs transformers >= "
                          f"{'.'.join(map(str, MIN_TRANSFORMERS))}, found {version}")


def register():
    """Register "tritongpt" with transformers (idempotent); raises ImportError when transformers is
    missing or older than the oldest supported release."""
    import transformers
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    check_version(transformers.__version__)
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


def _why_not_kernel(q, k, v, attention_mask, dropout, causal, kwargs):
    """None when the kernel computes this call, else the reason it goes to SDPA."""
    if attention_mask is not None:
        return "an explicit attention mask"
    if dropout:
        return "attention dropout"
    if kwargs.get("output_attentions") or kwargs.get("head_mask") is not None:
        return "output_attentions or a head mask"
    unknown = sorted(n for n, val in kwargs.items() if n not in KNOWN_KWARGS and val is not None)
    if unknown:
        return f"keywords the kernel does not take: {', '.join(unknown)}"
    if kwargs.get("sliding_window") is not None and k.shape[2] > kwargs["sliding_window"]:
        return "a sliding window shorter than the keys"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in _attention.DTYPES):
        return "mixed or unsupported dtypes"
    if q.shape[-1] not in _attention.HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return "a head dimension the kernel does not take"
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        return "query heads not a multiple of key/value heads"
    if causal and q.shape[2] > max(k.shape[2], 1):  # SDPA's start-aligned mask has no kernel equivalent
        return "causal with more queries than keys"
    return None


_last_mask = None  # (weak reference to a mask, its version and size, the verdict on it)


def _version_of(t):
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return None


def _sliding_causal(mask, Tq, Tk):
    """(True, window) when the boolean `mask` is, in every batch row and head, the kernel's own
    end-aligned causal mask (query i sees keys j <= i + Tk - Tq) cut to the `window` most recent
    keys (window None: no cut), what transformers builds for an unpadded sliding-window model
    such as Mistral; else (False, None). The mask is read once (one sync); the verdict is reused
    for the model's other layers, which get the same tensor, unless it was modified in place."""
    global _last_mask
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape[2:]) != (Tq, Tk) or not 0 < Tq <= Tk:
        return False, None
    size = (_version_of(mask), tuple(mask.shape))
    if _last_mask is not None and _last_mask[0]() is mask and _last_mask[1] == size and size[0] is not None:
        return _last_mask[2]
    width = int(mask[0, 0, -1].sum())  # the last query sees min(window, Tk) keys
    window = width if 0 < width < Tk else None
    verdict = (width > 0 and bool((mask == _kernel_mask(Tq, Tk, True, window, device=mask.device)).all()), window)
    _last_mask = (weakref.ref(mask), size, verdict)
    return verdict


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: (B, H, Tq, D) query, (B, H_kv, Tk, D) key and
    value -> ((B, Tq, H, D) output, None). See the module docstring for what runs the kernel."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Tq, Tk = query.shape[2], key.shape[2]
    known, window = (False, None)
    if attention_mask is not None and not torch.compiler.is_compiling():
        known, window = _sliding_causal(attention_mask, Tq, Tk)
    checked = {n: val for n, val in kwargs.items() if not (known and n == "sliding_window")}
    if _why_not_kernel(query, key, value, None if known else attention_mask, dropout, causal, checked) is not None:
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    if known:  # the mask is the kernel's end-aligned causal mask, with this window
        causal = True
    elif causal and 1 < Tq < Tk:
        # SDPA's is_causal aligns the mask to the start (query i sees keys j <= i), the kernel's to
        # the end: with more keys than queries (a prefill into a pre-allocated cache) the keys past
        # Tq are invisible to every query, so cropping them gives SDPA's answer.
        key, value = key[:, :, :Tq], value[:, :, :Tq]
    else:  # one query sees every key (end-aligned causal and non-causal agree there)
        causal = bool(causal) and Tq > 1
    # GQA / MQA go in as they are: the kernel's query head h reads key/value head h // (H // H_kv),
    # transformers' repeat_kv layout. softcap (Gemma 2's attn_logit_softcapping) is the kernel's own.
    out = op("flash_attention", query)(query, key, value, causal=bool(causal), sm_scale=scaling, window=window,
                                       softcap=kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None  # free with the kernel: its output is (B, Tq, H, D) memory


register()
