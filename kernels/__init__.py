"""tritongpt kernels: fused Triton ops for GPT-2 training, each with a plain-PyTorch reference.

    from kernels import layer_norm, cross_entropy, linear_cross_entropy   # the Triton kernels built so far
    from kernels import reference           # the plain-PyTorch definition of every op

Kernels not exported here yet (flash_attention, gelu_mlp) exist only in `reference` for now; the
model uses the reference for them.
"""
from . import reference
from .cross_entropy import cross_entropy, linear_cross_entropy
from .layer_norm import layer_norm

__all__ = ["cross_entropy", "layer_norm", "linear_cross_entropy", "reference"]
