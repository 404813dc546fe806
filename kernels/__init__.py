"""tritongpt kernels: fused Triton ops for GPT-2 training, each with a plain-PyTorch reference.

    from kernels import layer_norm, gelu_mlp, cross_entropy, linear_cross_entropy   # the Triton kernels built so far
    from kernels import reference           # the plain-PyTorch definition of every op
    kernels.patch(model)                    # swap the kernels into a transformers GPT-2 / nanoGPT model
    from kernels import nn                  # LayerNorm, GeluMLP, CausalSelfAttention modules

Kernels not exported here yet (flash_attention) exist only in `reference` for now; the model uses
the reference for them.
"""
from . import reference
from .cross_entropy import cross_entropy, linear_cross_entropy
from .layer_norm import layer_norm
from .mlp import gelu_mlp
from . import nn
from .patch import PatchReport, patch

__all__ = ["PatchReport", "cross_entropy", "gelu_mlp", "layer_norm", "linear_cross_entropy", "nn", "patch",
           "reference"]
