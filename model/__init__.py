"""tritongpt's GPT-2: `GPTConfig` (with named presets) and `GPT`; see model/gpt.py."""
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
