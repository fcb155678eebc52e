"""Device expert slots: preallocated buffers `[S, ...]` that hold routed experts on the device.

A set of slots serves one MoE layer, or (a shared pool) every MoE layer. The
jitted expert computation reads weights from these buffers by slot index
(`moejax.models.moe.routed_experts`). Which expert sits in which slot is
scheduler state (`moejax.scheduling.CacheState`); this module owns only the
buffers, the in-place copies that fill slots from the host store, and how many
slots a budget buys.

bfloat16 slots are held as their bit patterns (uint16, like every expert stack:
`moejax.models.moe.ExpertWeights`): XLA:CPU widens bfloat16 data movement to
float32, so writing one expert into a bfloat16 buffer rewrote the whole buffer,
twice, where a uint16 buffer is written in place (4-5x faster fills at real
expert sizes).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.models.config import MoEConfig
from moejax.models.moe import ExpertWeights, stored, stored_dtype


def fill_slots(buffers: ExpertWeights, source: ExpertWeights, experts: jax.Array, slots: jax.Array) -> ExpertWeights:
  """Copies experts `[M]` of `source` into `slots` `[M]` of `buffers` (entries with expert < 0 are skipped).

  Traceable: the engine calls it inside its jitted step. `source` is the
  layer's host store `[E, ...]` (`pinned_host` memory) or a device copy of it;
  each expert is sliced where it lives, moved to device memory and written into
  its slot with `dynamic_update_slice`, so with donated `buffers` a copy moves
  each expert's bytes once, into place.
  """

  def one(i, bufs):
    e, s = experts[i], slots[i]

    def copy(bufs):
      return ExpertWeights(
        *(
          jax.lax.dynamic_update_index_in_dim(
            b,
            stored(jax.device_put(jax.lax.dynamic_index_in_dim(w, e, keepdims=True), jax.memory.Space.Device)),
            s,
            0,
          )
          for b, w in zip(bufs, source)
        )
      )

    return jax.lax.cond(e >= 0, copy, lambda b: b, bufs)

  return jax.lax.fori_loop(0, experts.shape[0], one, buffers)


write_slots = jax.jit(fill_slots, donate_argnums=0)
"""`fill_slots` as its own jitted call (buffers donated: updated in place)."""


def empty_slots(config: MoEConfig, num_slots: int, dtype, device=None) -> ExpertWeights:
  """Zeroed slot buffers: gate/up `[S, F, D]`, down `[S, D, F]` (bfloat16 held as uint16 bits)."""
  d, f = config.hidden_size, config.moe_intermediate_size
  dtype = stored_dtype(dtype)
  with jax.default_device(device or jax.devices()[0]):
    return ExpertWeights(
      jnp.zeros((num_slots, f, d), dtype), jnp.zeros((num_slots, f, d), dtype), jnp.zeros((num_slots, d, f), dtype)
    )


CACHE_SCOPES = ("layer", "global")


def resolve_cache_slots(
  config: MoEConfig,
  *,
  cache_slots: int | None = None,
  cache_bytes: int | None = None,
  cache_fraction: float | None = None,
  dtype_bytes: int = 4,
  scope: str = "layer",
) -> int:
  """Slots of one set from exactly one of: a slot count, a total byte budget, a fraction of experts.

  scope "layer" (a set of slots per MoE layer): a byte budget is shared
  evenly by the MoE layers, a fraction is of one layer's experts, and the
  count is per layer. scope "global" (one pool for every MoE layer): the
  budget, the fraction (of all routed experts) and the count are the pool's.
  None of them: every expert (no eviction).
  """
  if scope not in CACHE_SCOPES:
    raise ValueError(f"cache_scope must be one of {CACHE_SCOPES}, got {scope!r}.")
  given = [x is not None for x in (cache_slots, cache_bytes, cache_fraction)]
  if sum(given) > 1:
    raise ValueError("Give at most one of cache_slots, cache_bytes, cache_fraction.")
  layers = len(config.moe_layer_ids) if scope == "global" else 1
  e = config.num_experts * layers
  if cache_bytes is not None:
    per_expert = config.expert_param_count() * dtype_bytes
    slots = int(cache_bytes // (per_expert * (len(config.moe_layer_ids) // layers)))
  elif cache_fraction is not None:
    if not 0 < cache_fraction <= 1:
      raise ValueError(f"cache_fraction must be in (0, 1], got {cache_fraction}.")
    slots = math.floor(cache_fraction * e)
  else:
    slots = e if cache_slots is None else int(cache_slots)
  if slots < 0:
    raise ValueError(f"cache_slots must be >= 0, got {slots}.")
  return min(slots, e)
