"""tritongpt: fused Triton kernels for GPT-2 training, checked against PyTorch references.

The one import name of the project. Its parts live in the repository's top-level folders and are
installed under this package (setup.py maps them), so nothing generic lands at the top level of
site-packages:

    from tritongpt import flash_attention, layer_norm   # the ops, re-exported from tritongpt.kernels
    from tritongpt.kernels import reference             # the plain-PyTorch definition of every op
    from tritongpt.model import GPT, GPTConfig          # the GPT-2 (model/gpt.py)
    tritongpt.kernels.patch(hf_model)                   # kernels into a transformers / nanoGPT model

tritongpt.data (tokenizer, shards, loader), tritongpt.trainer (train.py's parts) and
tritongpt.bench (the benchmarks) complete it.
"""
from .kernels import (cross_entropy, flash_attention, gelu_mlp, layer_norm, linear_cross_entropy, patch,
                      reference)

__all__ = ["cross_entropy", "flash_attention", "gelu_mlp", "layer_norm", "linear_cross_entropy", "patch",
           "reference"]
