"""GPT-2 in nanoGPT's shape, with GPT-2's parameter names, and a switch for the Triton kernels.

    config = GPTConfig.from_name("gpt2", kernels="auto")
    model = GPT(config)                          # or GPT.from_pretrained("gpt2")
    logits, loss = model(idx, targets)           # targets equal to -1 are ignored
    out = model.generate(idx, max_new_tokens=20, top_k=50)   # with a KV cache; use_cache=False without

Four ops can run as Triton kernels: layer_norm, attention, mlp (Linear -> tanh GELU -> Linear)
and cross_entropy. `GPTConfig.kernels` picks them: "none" (plain PyTorch, exactly the reference
GPT-2), "auto" (every available kernel where Triton can run on the input's device, none
elsewhere), "all" (every available kernel, and an error where Triton cannot run) or a
comma-separated subset such as "layer_norm,mlp". The choice is made at each forward from the
device of `idx`; it never changes the parameters, so state dicts are the same in every mode and
published GPT-2 weights load into any of them.

With the cross_entropy kernel on and targets given, the forward fuses the lm_head projection into
the loss (`kernels.linear_cross_entropy` on the final hidden state with the tied lm_head weight):
the (B, T, V) logits are never materialised and the forward returns (None, loss). Call the model
without targets to get logits.

`GPTConfig.doc_mask` (off by default) keeps attention inside documents when a row packs several,
as build-nanogpt's shards do: there every document is *prefixed* by <|endoftext|> (token 50256,
`GPTConfig.doc_sep_token`), so a separator starts its document. The document ids come from the
batch itself, doc_ids = cumsum(idx == doc_sep_token) along T (inclusive: the separator gets the id
of the document it opens), and a token attends only to earlier tokens of its own document. The
separator's own query therefore sees nothing but itself: the first token of a document is predicted
from <|endoftext|> alone, as at the start of a fresh sequence, never from the document before. (An
exclusive count, cumsum - (idx == sep), would put the separator at the end of the previous document
and let that prediction read it: right only for data where <|endoftext|> closes documents.) The
tokens before a row's first separator (the tail of a document cut by the row start) form document
0. Positions stay absolute along the row: only attention is masked. `generate` honours the mask,
with and without its KV cache.
"""
import dataclasses
import json
import math
import os
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tritongpt import kernels
from tritongpt.kernels._utils import triton_runs_on
from tritongpt.kernels.nn import merge_heads, split_heads

# op name in GPTConfig.kernels -> public function of the `kernels` package that implements it.
# A kernel is available once `kernels` exports that function; the model needs no change then.
KERNEL_FUNCTIONS = {
    "layer_norm": "layer_norm",
    "attention": "flash_attention",
    "mlp": "gelu_mlp",
    "cross_entropy": "cross_entropy",
}

PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512),  # for tests
}

# Hugging Face Hub repositories of OpenAI's GPT-2 checkpoints, by preset name.
HF_REPOS = {name: f"openai-community/{name}" for name in PRESETS if name.startswith("gpt2")}

# HF GPT2Config settings this model hard-codes: key -> accepted values (absent keys default to them).
HF_FIXED = {
    "layer_norm_epsilon": (1e-5,),
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
}
# Causal-mask buffers some HF versions save with the weights; this model has none.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# HF stores these as Conv1D weights, (in, out): the transpose of nn.Linear's (out, in).
HF_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# What from_pretrained lets a caller change; the rest is fixed by the checkpoint.
PRETRAINED_OVERRIDES = ("dropout", "kernels", "doc_mask", "doc_sep_token")


def available_kernels():
    """The ops whose Triton kernel the `kernels` package exports, in KERNEL_FUNCTIONS order."""
    return [op for op, fn in KERNEL_FUNCTIONS.items() if hasattr(kernels, fn)]


def _requested_kernels(spec, dropout):
    """Parse a kernels spec into (ops it turns on, whether it insists on them); ValueError if bad."""
    if not isinstance(spec, str):
        raise ValueError(f"GPTConfig.kernels must be a string, got {spec!r}")
    spec = spec.replace(" ", "")
    available = available_kernels()
    if spec == "none":
        return frozenset(), False
    if spec in ("auto", "all"):
        # The flash kernel has no attention dropout, so with dropout SDPA keeps doing attention.
        return frozenset(op for op in available if op != "attention" or dropout == 0), spec == "all"
    ops = spec.split(",")
    for op in ops:
        if op not in KERNEL_FUNCTIONS:
            raise ValueError(f"unknown kernel {op!r} in kernels={spec!r}: expected 'all', 'none', "
                             f"'auto' or a comma-separated subset of {','.join(KERNEL_FUNCTIONS)}")
        if op not in available:
            raise ValueError(f"kernel {op!r} is not implemented yet; available: "
                             f"{', '.join(available) or 'none'}")
    if "attention" in ops and dropout > 0:
        raise ValueError(f"kernel 'attention' has no attention dropout but dropout={dropout}: "
                         "set dropout=0.0 or leave 'attention' out of kernels")
    return frozenset(ops), True


def kernel_ops(config, device):
    """The ops that run as Triton kernels for `config` on tensors of `device`."""
    ops, insist = _requested_kernels(config.kernels, config.dropout)
    if ops and not triton_runs_on(device):
        if insist:
            raise ValueError(f"kernels={config.kernels!r} needs Triton, which cannot run on "
                             f"{torch.device(device)} here: use a CUDA device, set TRITON_INTERPRET=1 "
                             "before importing kernels to run them on CPU, or use kernels='auto'")
        return frozenset()
    return ops


def document_ids(idx, sep):
    """(B, T) document ids of the token ids idx (B, T): cumsum(idx == sep) along T, so that a
    separator starts its document (build-nanogpt prefixes every document with <|endoftext|>).
    See the module docstring."""
    return (idx == sep).cumsum(dim=1)


def _sdpa(q, k, v, dropout_p, doc_ids=None):
    """PyTorch's attention. Tq == Tk (training, a prefill): SDPA's causal fast path, with attention
    dropout. Tq < Tk (a KV-cache step): the reference, whose causal mask is aligned to the end, as
    the kernel's is; SDPA's is_causal would align it to the start and hide the cached keys.
    doc_ids (B, Tk), the keys' document ids (the queries are the last Tq keys): the reference's
    document mask (`_document_attention` with dropout or for a KV-cache step)."""
    tq, tk = q.shape[-2], k.shape[-2]
    if tq != tk and dropout_p:
        raise ValueError("attention dropout needs as many queries as keys; a KV-cache step has fewer")
    if doc_ids is not None:
        if tq == tk and not dropout_p:
            return kernels.reference.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)
        return _document_attention(q, k, v, doc_ids, dropout_p)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    return kernels.reference.flash_attention(q, k, v, causal=True)


def _flash_attention(q, k, v, dropout_p, doc_ids=None):
    """The kernel, with the document mask when doc_ids (B, Tk) is given. The kernel takes doc_ids
    only with as many queries as keys; a KV-cache step (Tq < Tk, one query per row against the
    cache) runs `_document_attention` instead: a (B, 1, Tq, Tk) mask costs nothing at that size."""
    if dropout_p:  # kernel_ops never picks the kernel with dropout; guard against a changed config
        raise ValueError("the flash_attention kernel has no attention dropout")
    if doc_ids is not None and q.shape[-2] != k.shape[-2]:
        return _document_attention(q, k, v, doc_ids, 0.0)
    return kernels.flash_attention(q, k, v, causal=True, doc_ids=doc_ids)


def _document_attention(q, k, v, doc_ids, dropout_p):
    """SDPA with an explicit mask for Tq <= Tk: causal aligned to the end (query i is key
    i + Tk - Tq) and the query's own document only, doc_ids (B, Tk) giving the keys' ids."""
    tq, tk = q.shape[-2], k.shape[-2]
    mask = kernels.reference.attention_mask(tq, tk, causal=True, device=q.device)
    same = doc_ids[:, None, tk - tq:, None] == doc_ids[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask & same, dropout_p=dropout_p)


class Ops(NamedTuple):
    """The op callables of one forward pass. A NamedTuple: torch.compile traces its construction,
    where a SimpleNamespace would break the graph."""
    layer_norm: Callable
    mlp: Callable
    cross_entropy: Callable
    linear_cross_entropy: Optional[Callable]  # the fused lm_head + loss, only with its kernel on
    attention: Callable


def select_ops(config, device):
    """The four op callables a forward pass on `device` uses: Triton kernels or the references."""
    on = kernel_ops(config, device)

    def pick(op):
        return getattr(kernels if op in on else kernels.reference, KERNEL_FUNCTIONS[op])

    return Ops(layer_norm=pick("layer_norm"), mlp=pick("mlp"), cross_entropy=pick("cross_entropy"),
               linear_cross_entropy=kernels.linear_cross_entropy if "cross_entropy" in on else None,
               attention=_flash_attention if "attention" in on else _sdpa)


@dataclasses.dataclass
class GPTConfig:
    """Model shape and options; defaults are GPT-2 124M. See the module docstring for `kernels`."""
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2 has
    kernels: str = "auto"
    doc_mask: bool = False  # attention stays inside documents (see the module docstring)
    doc_sep_token: int = 50256  # the token that starts a document: GPT-2's <|endoftext|>

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if (not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool)
                or not 0 <= self.dropout < 1):
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be a bool, got {self.bias!r}")
        if not isinstance(self.doc_mask, bool):
            raise ValueError(f"GPTConfig.doc_mask must be a bool, got {self.doc_mask!r}")
        sep = self.doc_sep_token
        if not isinstance(sep, int) or isinstance(sep, bool) or sep < 0:
            raise ValueError(f"GPTConfig.doc_sep_token must be an int >= 0, got {sep!r}")
        if self.doc_mask and sep >= self.vocab_size:
            raise ValueError(f"GPTConfig.doc_sep_token ({sep}) must be a token id below vocab_size "
                             f"({self.vocab_size}) with doc_mask=True")
        _requested_kernels(self.kernels, self.dropout)

    @classmethod
    def from_name(cls, name, **overrides):
        """A preset ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny") with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; expected one of {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {', '.join(unknown)}; "
                             f"fields are {', '.join(sorted(fields))}")
        return cls(**{**PRESETS[name], **overrides})


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with an optional bias (nn.LayerNorm always has one)."""

    def __init__(self, n_embd, bias, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def forward(self, x, ops):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class KVCache:
    """One attention layer's keys and values for the positions run so far (generate's KV cache).

    The (B, H, capacity, D) buffers are allocated on the first append and filled from the left;
    attention reads views of their first `length` positions (the ops accept any strides).
    """

    def __init__(self, capacity):
        self.capacity = capacity
        self.length = 0
        self.k = self.v = None

    def append(self, k, v):
        """Store k, v (B, H, T, D) after the cached positions; return the keys and values of all."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} asked")
        if self.k is None:
            shape = (*k.shape[:2], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, ops, cache=None, doc_ids=None):
        """x: (B, T, C). With a KVCache, x holds the T positions after the cached ones: their keys
        and values join the cache and their queries attend to every cached position (Tq < Tk, the
        causal mask aligned to the end). doc_ids (B, Tk): the document id of every key (the
        queries are the last T of them), or None for no document mask."""
        # (B, T, 3C) -> three (B, H, T, D) views; the ops accept non-contiguous inputs.
        q, k, v = split_heads(self.c_attn(x), self.n_head)
        if cache is not None:
            k, v = cache.append(k, v)
        y = ops.attention(q, k, v, self.dropout if self.training else 0.0, doc_ids)
        return self.resid_dropout(self.c_proj(merge_heads(y)))


class MLP(nn.Module):
    """Linear -> tanh GELU -> Linear, 4x wide. The Linears hold the weights; the op applies them."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, ops):
        y = ops.mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)
        return self.dropout(y)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x, ops, cache=None, doc_ids=None):
        x = x + self.attn(self.ln_1(x, ops), ops, cache, doc_ids)
        return x + self.mlp(self.ln_2(x, ops), ops)


class GPT(nn.Module):
    """GPT-2: token + position embeddings, n_layer blocks, final LayerNorm, tied lm_head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the init of every projection into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the position embeddings (wte is shared with
        lm_head, so it stays in), as nanoGPT counts."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def _check_inputs(self, idx, targets):
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long:
            raise TypeError(f"idx must be an int64 tensor, got {getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != 2 or not 1 <= idx.shape[1] <= self.config.block_size:
            raise ValueError(f"idx must have shape (B, T) with 1 <= T <= block_size="
                             f"{self.config.block_size}, got {tuple(idx.shape)}")
        if targets is None:
            return
        if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long:
            raise TypeError(f"targets must be an int64 tensor, got "
                            f"{getattr(targets, 'dtype', type(targets).__name__)}")
        if targets.shape != idx.shape or targets.device != idx.device:
            raise ValueError(f"targets must match idx's shape {tuple(idx.shape)} and device {idx.device}, "
                             f"got {tuple(targets.shape)} on {targets.device}")

    def forward(self, idx, targets=None):
        """idx: (B, T) int64 token ids -> (logits (B, T, V), mean loss over targets != -1 or None).

        With targets and the cross_entropy kernel on, the loss comes from linear_cross_entropy on
        the final hidden state (lm_head fused in, logits never materialised) and logits is None.
        """
        self._check_inputs(idx, targets)
        ops = select_ops(self.config, idx.device)
        x = self._hidden(idx, ops)
        if targets is not None and ops.linear_cross_entropy is not None:
            loss = ops.linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight,
                                            targets.reshape(-1), ignore_index=-1)
            return None, loss
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _hidden(self, idx, ops, caches=None, context=None):
        """Embeddings, blocks and the final LayerNorm: idx (B, T) -> (B, T, C). With caches (one
        KVCache per layer), idx holds the tokens after the cached ones, at absolute positions
        from the cache's length on, and the caches grow by them. With doc_mask, context (B, Tk)
        holds the tokens of every key (the cached ones, then idx; idx itself when None), from
        which the document ids come."""
        start = caches[0].length if caches else 0
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        doc_ids = None
        if self.config.doc_mask:
            doc_ids = document_ids(idx if context is None else context, self.config.doc_sep_token)
        for i, block in enumerate(self.transformer.h):
            x = block(x, ops, caches[i] if caches else None, doc_ids)
        return self.transformer.ln_f(x, ops)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Sample max_new_tokens tokens after idx (B, T) -> (B, T + max_new_tokens).

        Each token is drawn from the logits the model gives for the last block_size tokens, divided
        by temperature and, with top_k, all but the k largest dropped. Call model.eval() first to
        turn off dropout.

        use_cache=True keeps a KV cache: the prompt runs once (prefill), then each step runs only
        the new token, at its absolute position, against the cached keys and values. The position
        embeddings are learned and absolute, so once the sequence passes block_size the cropped
        window's positions all shift and the cached keys go stale: from then on each step re-runs
        the last block_size tokens (a fresh prefill), what use_cache=False does at every step.
        Both give the same logits up to rounding, so the same tokens. In training mode with dropout > 0 no cache is kept (attention
        dropout runs only with as many queries as keys). With config.doc_mask the document mask
        holds here too: the prefill passes document ids to the attention op, and each cached step's
        query sees only the cached keys of its own document (an explicit mask in PyTorch's SDPA,
        since the kernel takes document ids only with as many queries as keys).
        """
        _check_sampling(max_new_tokens, temperature, top_k, use_cache)
        use_cache = use_cache and not (self.training and self.config.dropout > 0)
        caches = None
        for _ in range(max_new_tokens):
            logits, caches = self._next_logits(idx, caches if use_cache else None)
            idx = torch.cat((idx, _sample(logits, temperature, top_k)), dim=1)
        return idx

    def _next_logits(self, idx, caches):
        """(B, V) logits of the token after idx, and the caches for the next call.

        caches None (the first call, or no cache wanted) or full (the sequence has passed
        block_size): run the last block_size tokens from scratch, into fresh caches. Otherwise
        the caches hold every token of idx but the last, and only the last one runs.
        """
        ops = select_ops(self.config, idx.device)
        if caches is None or caches[0].length == self.config.block_size:
            idx = idx[..., -self.config.block_size:]  # `...`: a bad rank reaches the check
            self._check_inputs(idx, None)
            caches = [KVCache(self.config.block_size) for _ in self.transformer.h]
            context = None
        else:
            # the cached tokens and the new one: their document ids, with doc_mask
            context = idx[:, -(caches[0].length + 1):]
            idx = idx[:, -1:]
        x = self._hidden(idx, ops, caches, context)
        return self.lm_head(x[:, -1]), caches

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """Load GPT-2 weights in Hugging Face's format, on CPU in float32.

        name_or_dir: a directory holding config.json and model.safetensors (or pytorch_model.bin),
        as GPT2Model or GPT2LMHeadModel.save_pretrained writes it, or a preset name ("gpt2",
        "gpt2-medium", "gpt2-large", "gpt2-xl") to download from the Hugging Face Hub.
        overrides: only `dropout` and `kernels`; the checkpoint fixes the rest.
        """
        fixed = sorted(set(overrides) - set(PRETRAINED_OVERRIDES))
        if fixed:
            raise ValueError(f"from_pretrained cannot override {', '.join(fixed)}: the checkpoint "
                             f"fixes it; only {', '.join(PRETRAINED_OVERRIDES)} may be set")
        directory = _checkpoint_dir(name_or_dir)
        model = cls(_read_hf_config(directory, overrides))
        model._load_hf_state(_read_hf_weights(directory))
        return model

    def _load_hf_state(self, hf_state):
        """Copy a Hugging Face GPT-2 state dict into this model, checking every key and shape."""
        state = _hf_to_own_names(hf_state)
        head = state.pop("lm_head.weight", None)
        own = self.state_dict()
        expected = set(own) - {"lm_head.weight"}  # tied to transformer.wte.weight
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"checkpoint does not fit GPT({self.config}): missing keys {missing}, "
                             f"unexpected keys {unexpected}, wrong shapes {wrong}")
        if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
            raise ValueError("checkpoint's lm_head.weight differs from wte.weight; this model ties them")
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor)


def _check_sampling(max_new_tokens, temperature, top_k, use_cache):
    """ValueError naming the first bad argument of GPT.generate."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if not isinstance(use_cache, bool):
        raise ValueError(f"use_cache must be a bool, got {use_cache!r}")


def _sample(logits, temperature, top_k):
    """One token id per row of (B, V) logits -> (B, 1): softmax(logits / temperature), top_k kept."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def flops_per_token(n_params, n_layer, n_embd, seq_len):
    """Training FLOPs per token (forward + backward), nanoGPT's estimate after the PaLM paper's
    appendix B: 6 per parameter (2 forward, 4 backward) plus 12 * layers * width * context for the
    attention scores and their use, which no parameter count sees. MFU in train.py and bench/."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def _checkpoint_dir(name_or_dir):
    """The local directory for name_or_dir, downloading a preset from the Hub."""
    if isinstance(name_or_dir, (str, os.PathLike)) and os.path.isdir(name_or_dir):
        return os.fspath(name_or_dir)
    if name_or_dir not in HF_REPOS:
        raise ValueError(f"{name_or_dir!r} is neither a directory nor one of {', '.join(HF_REPOS)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"loading {name_or_dir!r} downloads it from the Hugging Face Hub: "
                          "pip install huggingface_hub, or pass a local directory holding "
                          "config.json and model.safetensors") from e
    return snapshot_download(HF_REPOS[name_or_dir], allow_patterns=["config.json", "model.safetensors"])


def _read_hf_config(directory, overrides):
    """A GPTConfig from a Hugging Face GPT2Config's config.json, with overrides applied."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {directory}")
    with open(path) as f:
        hf = json.load(f)
    needed = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
    missing = [key for key in needed if key not in hf]
    if missing:
        raise ValueError(f"{path} is not a GPT-2 config: it lacks {', '.join(missing)}")
    for key, accepted in HF_FIXED.items():
        if key in hf and hf[key] not in accepted:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported; this model uses {accepted[0]!r}")
    return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                     block_size=hf["n_positions"], vocab_size=hf["vocab_size"], bias=True, **overrides)


def _read_hf_weights(directory):
    """The state dict in model.safetensors, else pytorch_model.bin, loaded on CPU."""
    path = os.path.join(directory, "model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_file
        return load_file(path)
    path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory}")


def _hf_to_own_names(hf_state):
    """Rename a Hugging Face GPT-2 state dict to this model's keys and Linear layout."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith(HF_BUFFERS):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model saves without the prefix
        state[key] = tensor.t() if key.endswith(HF_CONV1D) else tensor
    return state
