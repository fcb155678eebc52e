"""How an engine lays out a model's routed experts under a policy, decided once.

- `slot_count`: slots per pool from the cache budget, checked against the policy.
- `placements`: each MoE layer's `Residency` and pool: the one place where the
  `PolicySpec` decides where experts live.
- `initial_pools`: empty (or, for the static policy, pre-filled) slot pools.
- `similarity_per_layer`: the `[E, E]` matrices substitution ranks by.
- `layer_facts`: the byte counts and policy facts the event trace needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.engine.state import LayerPlacement, Residency, SlotPool
from moejax.engine.stats import LayerFacts
from moejax.models.config import MoEConfig
from moejax.models.model import Model
from moejax.models.moe import ExpertWeights
from moejax.offload import slots as slot_lib
from moejax.scheduling import cache
from moejax.scheduling import similarity as similarity_lib
from moejax.scheduling.policies import PolicySpec


def slot_count(
  config: MoEConfig, spec: PolicySpec, *, cache_slots, cache_bytes, cache_fraction, scope: str, dtype_bytes: int
) -> int:
  """Slots of each pool (per MoE layer, or one pool for all with scope "global") the policy gets.

  Policies without a device cache get every expert (resident, layerwise) or
  none (cpu). A policy that never computes on the CPU needs room for a
  token's k experts: a ValueError says so otherwise.
  """
  e = config.num_experts
  if not spec.cache or spec.layerwise:
    return e
  if spec.cpu_compute == "always" and not spec.static and spec.prefetch is None:
    return 0  # nothing is ever loaded: no device cache at all
  slots = slot_lib.resolve_cache_slots(
    config,
    cache_slots=cache_slots,
    cache_bytes=cache_bytes,
    cache_fraction=cache_fraction,
    dtype_bytes=dtype_bytes,
    scope=scope,
  )
  k = config.num_experts_per_tok
  if spec.cpu_compute == "never" and slots < k:
    where = "in the shared pool" if scope == "global" else "per layer"
    raise ValueError(
      f"cache_slots={slots} {where} is below top-k={k} and policy {spec.name!r} never computes on the CPU: "
      f"raise the cache to >= {k} slots, or use a policy with CPU compute (e.g. 'smoe', 'cpu')."
    )
  return slots


def placements(config: MoEConfig, spec: PolicySpec, num_slots: int, scope: str) -> tuple[LayerPlacement | None, ...]:
  """Per decoder layer, where its routed experts live (None for a dense layer)."""
  if not spec.cache:
    place = lambda j: LayerPlacement(Residency.RESIDENT)
  elif spec.layerwise:
    place = lambda j: LayerPlacement(Residency.STREAMED)
  elif num_slots == 0:
    place = lambda j: LayerPlacement(Residency.CPU)
  elif scope == "global":
    place = lambda j: LayerPlacement(Residency.CACHED, pool=0, group=j)
  else:
    place = lambda j: LayerPlacement(Residency.CACHED, pool=j)
  moe_index = {l: j for j, l in enumerate(config.moe_layer_ids)}
  return tuple(place(moe_index[l]) if l in moe_index else None for l in range(config.num_layers))


def initial_pools(
  config: MoEConfig,
  layout: Sequence[LayerPlacement | None],
  num_slots: int,
  *,
  window: int,
  dtype,
  store: Sequence[ExpertWeights | None],
  initial: dict[int, Sequence[int]] | None = None,
) -> tuple[SlotPool, ...]:
  """The slot pools of a placement, empty or holding `initial` {MoE layer: experts} (copied from `store`)."""
  e = config.num_experts
  groups: dict[int, list[tuple[int, int]]] = {}  # pool -> [(layer, group)]
  for l, place in enumerate(layout):
    if place is not None and place.residency == Residency.CACHED:
      groups.setdefault(place.pool, []).append((l, place.group))
  pools = []
  for p in sorted(groups):
    keys = np.full(num_slots, -1, np.int32)
    held = [(l, g, int(x)) for l, g in groups[p] for x in (initial or {}).get(l, ())]
    if len(held) > num_slots:
      raise ValueError(f"{len(held)} initial experts do not fit in {num_slots} slots.")
    keys[: len(held)] = [g * e + x for _, g, x in held]
    table = cache.init_cache_state(e, num_slots, window=window, initial_experts=keys, num_groups=len(groups[p]))
    weights = slot_lib.empty_slots(config, num_slots, dtype)
    for l, g in groups[p]:
      mine = [(s, x) for s, (ll, _, x) in enumerate(held) if ll == l]
      if mine:
        slots_, experts = (jnp.asarray(v, jnp.int32) for v in zip(*mine))
        weights = slot_lib.write_slots(weights, store[l], experts, slots_)
    pools.append(SlotPool(table, weights))
  return tuple(pools)


def layer_order_fill(config: MoEConfig, num_slots: int, scope: str) -> dict[int, list[int]]:
  """The released code's start: experts in ascending id, first MoE layer first, until the slots are full (per
  layer: the first `num_slots` experts of each layer)."""
  e = config.num_experts
  if scope != "global":
    return {l: list(range(min(num_slots, e))) for l in config.moe_layer_ids}
  return {l: list(range(min(e, num_slots - j * e))) for j, l in enumerate(config.moe_layer_ids) if num_slots > j * e}


def most_used(counts: dict[int, np.ndarray], num_slots: int, scope: str) -> dict[int, list[int]]:
  """The static policy's resident sets: per MoE layer its most used experts (`counts` `[E]` per layer), or with
  scope "global" the `num_slots` most used (layer, expert) pairs over all layers (ties: earlier layer, lower id)."""
  if scope != "global":
    return {l: np.argsort(-c, kind="stable")[:num_slots].tolist() for l, c in counts.items()}
  layers = sorted(counts)
  flat = np.concatenate([counts[l] for l in layers])
  e = len(counts[layers[0]])
  chosen = np.argsort(-flat, kind="stable")[:num_slots]
  return {l: sorted(int(k % e) for k in chosen if k // e == j) for j, l in enumerate(layers)}


def similarity_per_layer(model: Model, spec: PolicySpec, sim) -> tuple[jax.Array | None, ...]:
  """Per decoder layer, the `[E, E]` similarity substitution ranks by (None where unused).

  sim: `[L_moe, E, E]`, `[num_layers, E, E]` or `[E, E]` (every layer), or
  None for the router-weight cosine.
  """
  config = model.config
  out = [None] * config.num_layers
  if spec.substitution not in ("similarity", "buddy"):
    return tuple(out)
  layers = model.decoder.layers
  if sim is not None:
    sim = np.asarray(sim, np.float32)
  for j, l in enumerate(config.moe_layer_ids):
    if sim is None:
      out[l] = similarity_lib.router_cosine(layers[l].mlp.router.weight[...])  # the router is [E, D]
    elif sim.ndim == 2:
      out[l] = jnp.asarray(sim)
    else:
      out[l] = jnp.asarray(sim[l] if sim.shape[0] == config.num_layers else sim[j])
  return tuple(out)


def _nbytes(tree) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


def layer_facts(model: Model, spec: PolicySpec, layout: Sequence[LayerPlacement | None]) -> LayerFacts:
  """Bytes of the weights as stored (per layer, one routed expert, the head) and what the policy's predictor
  reads: during MoE layer l, the predictor of the next MoE layer when that layer takes a prefetch."""
  config = model.config
  dtype_bytes = jnp.dtype(model.dtype).itemsize
  layers = model.decoder.layers
  dense = tuple(_nbytes(nnx.state(layer)) for layer in layers)  # routed experts are not in the module
  expert = tuple(
    config.expert_param_count() * dtype_bytes if config.moe_layers[l] else 0 for l in range(config.num_layers)
  )
  predictor_bytes, predictor = [0] * config.num_layers, [""] * config.num_layers
  moe_ids = config.moe_layer_ids
  for l, nxt in itertools.pairwise(moe_ids):
    if spec.prefetch is None or layout[nxt].residency != Residency.CACHED:
      continue
    predictor[l] = spec.prefetch
    router = _nbytes(nnx.state(layers[nxt].mlp.router))
    if spec.prefetch == "provisional":
      predictor_bytes[l] = dense[nxt]
    elif spec.prefetch == "gate":
      predictor_bytes[l] = router
    elif spec.prefetch == "layernorm":  # the two norms of the next layer, the shared experts of this one, the gate
      norms = _nbytes(nnx.state(layers[nxt].input_layernorm)) + _nbytes(nnx.state(layers[nxt].post_attention_layernorm))
      shared = _nbytes(nnx.state(layers[l].mlp.shared)) if layers[l].mlp.shared is not None else 0
      predictor_bytes[l] = norms + shared + router
  head = _nbytes(nnx.state(model.decoder.norm)) + config.vocab_size * config.hidden_size * dtype_bytes
  split = spec.cpu_compute if spec.split_costs else ""
  return LayerFacts(dense, expert, tuple(predictor_bytes), tuple(predictor), split, head)
