"""moejax: offloaded Mixture-of-Experts inference and importance-driven expert scheduling in JAX."""

from moejax.assets import default_model_path
from moejax.checkpoints.loader import load
from moejax.engine import Engine, EngineOptions
from moejax.models.compile import enable_compilation_cache
from moejax.models.config import MoEConfig, from_hf_config
from moejax.models.model import Model

__all__ = [
  "Engine",
  "EngineOptions",
  "MoEConfig",
  "Model",
  "default_model_path",
  "enable_compilation_cache",
  "from_hf_config",
  "load",
]
