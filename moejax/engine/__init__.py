"""The decode engine that drives model, offload and scheduling.

- `engine`: `Engine` (the public API), `EngineOptions`, `Decoding`, `GenerationResult`.
- `state`: the typed step state (`DecodeState`), constants and static config.
- `stages`: the forward step written once, its stages, and how they run (fused or staged).
- `schedule`: the per-layer scheduling decision; `stats`: `LayerCounters`, `RunStats`.
- `setup`: slot sizing and placement; `costs`: the load/CPU split's costs.
"""

from moejax.engine.engine import Decoding, Engine, EngineOptions, GenerationResult

__all__ = ["Decoding", "Engine", "EngineOptions", "GenerationResult"]
