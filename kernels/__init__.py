"""tritongpt kernels: fused Triton ops for GPT-2 training, each with a plain-PyTorch reference.

    from kernels import layer_norm, flash_attention, cross_entropy, linear_cross_entropy   # Triton kernels
    from kernels import reference           # the plain-PyTorch definition of every op

Kernels not exported here yet (gelu_mlp) exist only in `reference` for now; the
model uses the reference for them.
"""
from . import reference
from .attention import flash_attention
from .cross_entropy import cross_entropy, linear_cross_entropy
from .layer_norm import layer_norm

__all__ = ["cross_entropy", "flash_attention", "layer_norm", "linear_cross_entropy", "reference"]
