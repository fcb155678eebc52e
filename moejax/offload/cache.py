"""Device expert cache: per MoE layer, preallocated slot buffers `[S, ...]`.

The jitted expert computation reads weights from these buffers by slot index
(`moejax.models.moe.routed_experts`). Which expert sits in which slot is
scheduler state (`moejax.scheduling.CacheState`); this module owns only the
buffers and the in-place writes that fill slots from host copies.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.config import MoEConfig
from moejax.models.moe import ExpertWeights


@functools.partial(jax.jit, donate_argnums=0)
def _write_slots(buffers: ExpertWeights, slots: jax.Array, new: ExpertWeights) -> ExpertWeights:
  """buffers `[S, ...]`, slots `[M]`, new `[M, ...]` (or M-tuples) -> buffers with slots overwritten."""
  stacked = ExpertWeights(*(jnp.stack(a) if isinstance(a, (tuple, list)) else a for a in new))
  return ExpertWeights(*(b.at[slots].set(n.astype(b.dtype)) for b, n in zip(buffers, stacked)))


def empty_slots(config: MoEConfig, num_slots: int, dtype, device=None) -> ExpertWeights:
  """Zeroed slot buffers for one layer: gate/up `[S, D, F]`, down `[S, F, D]`."""
  d, f = config.hidden_size, config.moe_intermediate_size
  with jax.default_device(device or jax.devices()[0]):
    return ExpertWeights(
        jnp.zeros((num_slots, d, f), dtype), jnp.zeros((num_slots, d, f), dtype), jnp.zeros((num_slots, f, d), dtype)
    )


def write_slots(buffers: ExpertWeights, slots: np.ndarray, new: ExpertWeights) -> ExpertWeights:
  """Writes device copies `new` into `slots` of `buffers` in place (buffers are donated)."""
  return _write_slots(buffers, jnp.asarray(slots, jnp.int32), new)


def resolve_cache_slots(
    config: MoEConfig,
    *,
    cache_slots: int | None = None,
    cache_bytes: int | None = None,
    cache_fraction: float | None = None,
    dtype_bytes: int = 4,
) -> int:
  """Slots per MoE layer from exactly one of: a slot count, a total byte budget, a fraction of experts.

  A byte budget is shared evenly by the MoE layers; a fraction is of the
  experts of one layer. None of them: every expert (no eviction).
  """
  given = [x is not None for x in (cache_slots, cache_bytes, cache_fraction)]
  if sum(given) > 1:
    raise ValueError("Give at most one of cache_slots, cache_bytes, cache_fraction.")
  e = config.num_experts
  if cache_bytes is not None:
    per_expert = config.expert_param_count() * dtype_bytes
    slots = int(cache_bytes // (per_expert * len(config.moe_layer_ids)))
  elif cache_fraction is not None:
    if not 0 < cache_fraction <= 1:
      raise ValueError(f"cache_fraction must be in (0, 1], got {cache_fraction}.")
    slots = int(math.floor(cache_fraction * e))
  else:
    slots = e if cache_slots is None else int(cache_slots)
  if slots < 0:
    raise ValueError(f"cache_slots must be >= 0, got {slots}.")
  return min(slots, e)
