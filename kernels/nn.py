"""nn.Module versions of the kernels for new code: LayerNorm, GeluMLP, CausalSelfAttention.

    from tritongpt.kernels import nn as knn
    ln = knn.LayerNorm(768)                          # nn.LayerNorm's constructor and names
    mlp = knn.GeluMLP(768)                           # c_fc / c_proj nn.Linear, as nanoGPT's MLP
    attn = knn.CausalSelfAttention(768, n_head=12)   # c_attn / c_proj nn.Linear, as nanoGPT's

Parameter names (and so state-dict keys) are those of nn.LayerNorm and nanoGPT's MLP and
CausalSelfAttention, so weights move between them and these modules unchanged. Each forward runs
the Triton kernel where Triton can run on the input's device (CUDA, or CPU under
TRITON_INTERPRET=1) and the same maths from kernels.reference elsewhere. The kernels are
torch.library custom ops, so torch.compile(fullgraph=True) traces these modules whole.
"""
import contextlib
import sys

import torch.nn.functional as F
from torch import nn

from . import reference
from ._utils import triton_runs_on

_package = sys.modules[__package__]  # `kernels`, looked up at call time (tests may swap its functions)
_force_reference = False


@contextlib.contextmanager
def reference_ops():
    """Within this block every module here (and every module kernels.patch swapped) runs the
    kernels.reference ops: kernels.patch compares a module's maths with them in float64 on CPU."""
    global _force_reference
    before, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = before


def op(name, like):
    """kernels.<name> where Triton can run on like's device, else kernels.reference.<name>."""
    fn = getattr(_package, name, None)
    if fn is None or _force_reference or not triton_runs_on(like.device):
        return getattr(reference, name)
    return fn


def split_heads(qkv, n_head):
    """(B, T, 3C) fused projection -> q, k, v as (B, H, T, D) views (the kernel reads strides)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    return (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2))


def merge_heads(y):
    """(B, H, T, D) -> (B, T, H * D)."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last dimension, run by kernels.layer_norm.

    Same constructor, attributes (normalized_shape, eps, weight, bias) and state dict as
    nn.LayerNorm, and an instance of it; normalized_shape must be a single dimension.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
                 dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one dimension (the last), got {self.normalized_shape}")

    def forward(self, x):
        if x.shape[-1:] != self.normalized_shape:
            raise ValueError(f"x's last dimension must be {self.normalized_shape[0]}, got shape {tuple(x.shape)}")
        return op("layer_norm", x)(x, self.weight, self.bias, self.eps)


class GeluMLP(nn.Module):
    """nanoGPT's MLP, c_fc -> GELU -> c_proj -> dropout, the first three fused by kernels.gelu_mlp.

    n_embd: input and output width; n_hidden: the hidden width (default 4 * n_embd); bias: biases in
    both Linears; dropout: applied to the output (outside the kernel, as nanoGPT applies it);
    approximate: "tanh" (GPT-2's GELU) or "none" (the exact erf GELU, nn.GELU()'s default).
    """

    def __init__(self, n_embd, n_hidden=None, bias=True, dropout=0.0, approximate="tanh", device=None,
                 dtype=None):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        n_hidden = 4 * n_embd if n_hidden is None else n_hidden
        self.approximate = approximate
        self.c_fc = nn.Linear(n_embd, n_hidden, bias=bias, device=device, dtype=dtype)
        self.c_proj = nn.Linear(n_hidden, n_embd, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = op("gelu_mlp", x)(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                              approximate=self.approximate)
        return self.dropout(y)


class CausalSelfAttention(nn.Module):
    """nanoGPT's causal self-attention: c_attn (fused q, k, v) -> kernels.flash_attention -> c_proj
    -> resid_dropout.

    The kernel has no attention dropout: in training mode with dropout > 0 the attention itself
    runs as PyTorch's SDPA with dropout_p=dropout (what nanoGPT does); otherwise it is the kernel.
    """

    def __init__(self, n_embd, n_head, bias=True, dropout=0.0, device=None, dtype=None):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_embd, self.n_head, self.dropout = n_embd, n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias, device=device, dtype=dtype)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias, device=device, dtype=dtype)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        q, k, v = split_heads(self.c_attn(x), self.n_head)
        if self.training and self.dropout > 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)
        else:
            y = op("flash_attention", q)(q, k, v, causal=True)
        return self.resid_dropout(self.c_proj(merge_heads(y)))
