"""moejax: offloaded Mixture-of-Experts inference and importance-driven expert scheduling in JAX."""

from moejax.assets import default_model_path
from moejax.checkpoints.loader import load
from moejax.engine import Engine, EngineOptions
from moejax.models.config import MoEConfig, from_hf_config
from moejax.models.model import Model

__all__ = ["load", "default_model_path", "Engine", "EngineOptions", "Model", "MoEConfig", "from_hf_config"]
