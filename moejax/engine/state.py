"""The engine's state and configuration as typed pytrees.

A forward step is `DecodeState -> DecodeState` under a static `StepConfig`
and per-engine `StepConstants`:

- `StepConfig` (static, hashable; a jit argument by value): the model
  config, the policy, where each MoE layer's routed experts live
  (`LayerPlacement`), and what the step computes (exact, warm, score, routing).
- `StepConstants` (device arrays that never change during a run): the
  decoder's parameters, the host expert store (or resident experts) and the
  similarity matrix per MoE layer, alpha, the cache-prior strength and the
  per-expert costs of the load/CPU split.
- `DecodeState` (donated to every step and updated in place): the KV cache
  and the device slot pools with their scheduler bookkeeping.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax

from moejax.models.config import MoEConfig
from moejax.models.layers import KVCache
from moejax.models.moe import ExpertWeights
from moejax.scheduling.balance import CostModel
from moejax.scheduling.cache import CacheState
from moejax.scheduling.policies import PolicySpec


class Residency(enum.Enum):
  """Where one MoE layer's routed experts live during decoding."""

  RESIDENT = "resident"  # every expert on the device (the model's own arrays); no offloading
  STREAMED = "streamed"  # every expert copied in before the layer runs (layerwise)
  CACHED = "cached"  # a bounded set in device slots; the rest loaded on demand, prefetched or run on the CPU
  CPU = "cpu"  # no device slots: every routed pair runs on the host


class LayerPlacement(NamedTuple):
  """Residency of one MoE layer; a CACHED layer's slots are pool `pool` of `DecodeState.pools`, where its
  experts are group `group` of the pool's `CacheState` (0 unless the pool is shared by several layers)."""

  residency: Residency
  pool: int = -1
  group: int = 0


class StepConfig(NamedTuple):
  """What one forward step computes (static, hashable).

  placements: per decoder layer, the MoE layer's `LayerPlacement` (None for a
    dense layer).
  exact: every MoE layer computes the model's own routing with all its
    experts on the device (streamed from the host when not resident): the
    exact prefill, and the layerwise policy.
  warm: after an exact layer, admit the experts its tokens used into the
    layer's slots (copied from the streamed ones).
  score: the head returns next-token log-probs of every position (else the
    last position's logits).
  routing: the step also returns the experts computed per pair.
  head: compute the LM head (False: the step returns zero logits; for timing
    the decoder's forward alone, with forced tokens).
  """

  config: MoEConfig
  spec: PolicySpec
  substitute_weight: str
  placements: tuple[LayerPlacement | None, ...]
  exact: bool = False
  warm: bool = False
  score: bool = False
  routing: bool = False
  head: bool = True


class SlotPool(NamedTuple):
  """A set of device expert slots: its bookkeeping (`CacheState`) and its weight buffers `[S, ...]`."""

  table: CacheState
  weights: ExpertWeights


class DecodeState(NamedTuple):
  """Everything a step reads and writes: donated, updated in place.

  kv: per decoder layer, its `KVCache` `[B, max_len, ...]`.
  pools: the device slot pools (per MoE layer, or one shared).
  """

  kv: tuple[KVCache, ...]
  pools: tuple[SlotPool, ...]


class StepConstants(NamedTuple):
  """Per-engine inputs of every step that never change during a run.

  params: the decoder's parameter leaves (`nnx.split` order; routed experts are not among them).
  experts: per decoder layer, the routed experts `[E, ...]` a step reads from
    (the `pinned_host` store, or the device arrays of a RESIDENT layer); None
    for dense layers.
  similarity: per decoder layer, `[E, E]` for similarity / buddy substitution, or None.
  alpha: substitution threshold; prior_strength: cache-prior logit bias.
  costs: per-expert load / CPU costs of the balance split (`moejax.engine.costs`).
  """

  params: list[jax.Array]
  experts: tuple[ExpertWeights | None, ...]
  similarity: tuple[jax.Array | None, ...]
  alpha: jax.Array
  prior_strength: jax.Array
  costs: CostModel


class StepInput(NamedTuple):
  """One step's tokens: ids `[B, T]`, rotary positions `[B, T]`, valid `[B, T]` bool (False: padding), and the
  KV cache row `index` of the first token."""

  ids: jax.Array
  positions: jax.Array
  valid: jax.Array
  index: jax.Array
