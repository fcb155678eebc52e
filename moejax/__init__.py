"""moejax: offloaded Mixture-of-Experts inference and importance-driven expert scheduling in JAX."""

from moejax.checkpoints.loader import load
from moejax.models.config import MoEConfig, from_hf_config
from moejax.models.model import Model

__all__ = ["load", "Model", "MoEConfig", "from_hf_config"]
