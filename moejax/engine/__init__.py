"""The decode engine that drives model, offload and scheduling."""

from moejax.engine.engine import Engine, GenerationResult

__all__ = ["Engine", "GenerationResult"]
