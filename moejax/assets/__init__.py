"""Models shipped inside the package."""

import os


def default_model_path() -> str:
  """Directory of the shipped small Qwen2-MoE in the HF format (see its README.md); `moejax.load` takes it."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_moe")
