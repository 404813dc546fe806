"""tritongpt kernels: fused Triton ops for GPT-2 training, each with a plain-PyTorch reference.

    from tritongpt.kernels import layer_norm, flash_attention, gelu_mlp, cross_entropy, linear_cross_entropy
    from tritongpt.kernels import reference           # the plain-PyTorch definition of every op
    kernels.patch(model)                    # swap the kernels into a transformers GPT-2 / nanoGPT model
    from tritongpt.kernels import nn                  # LayerNorm, GeluMLP, CausalSelfAttention modules

Every op is a torch.library custom op, so torch.compile(fullgraph=True) traces code that uses them.
"""
from . import reference
from .attention import flash_attention
from .cross_entropy import cross_entropy, linear_cross_entropy
from .layer_norm import layer_norm
from .mlp import gelu_mlp
from . import nn
from .patch import PatchReport, patch

__all__ = ["PatchReport", "cross_entropy", "flash_attention", "gelu_mlp", "layer_norm", "linear_cross_entropy",
           "nn", "patch", "reference"]
