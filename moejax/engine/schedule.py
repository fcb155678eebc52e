"""One jitted scheduling decision per MoE layer and step.

`schedule_layer` turns a layer's router scores into everything the step needs
before expert compute: the experts per token after substitution, mixing
weights, which experts to copy into which slots (with eviction), which pairs
run on the CPU, the updated slot bookkeeping and the layer's `LayerCounters`.
`schedule_exact` is the model's own routing with every expert on the device
(exact prefill, layerwise, resident layers); `prefetch_layer` admits the
experts a predictor expects the next layer to use. All are pure.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.engine.state import Residency
from moejax.engine.stats import LayerCounters
from moejax.models import moe
from moejax.models.config import MoEConfig
from moejax.scheduling import balance, cache, prefetch, routing
from moejax.scheduling.policies import PolicySpec


class LayerPlan(NamedTuple):
  """Static facts of one MoE layer's scheduling: the model, the policy, and the layer's group in its pool."""

  config: MoEConfig
  spec: PolicySpec
  substitute_weight: str
  group: int = 0


class Knobs(NamedTuple):
  """Traced scheduling parameters: alpha, the cache-prior strength, the layer's `[E, E]` similarity (or None)."""

  alpha: jax.Array
  prior_strength: jax.Array
  similarity: jax.Array | None


class LayerDecision(NamedTuple):
  """What one layer's scheduling decided (device arrays).

  experts `[N, k]` ids computed per token, mix `[N, k]` mixing weights,
  top `[N, k]` the pair's expert is top-score, slots `[N, k]` device slot per
  pair (-1: not on the device), on_cpu `[N, k]`, demand `[N, k]` the pair's
  expert is copied in by this plan (not resident before it), loads /
  load_slots `[M]` experts to copy and their slots (-1 padded), table: the
  pool's updated `CacheState` (None without slots), counters.
  """

  experts: jax.Array
  mix: jax.Array
  top: jax.Array
  slots: jax.Array
  on_cpu: jax.Array
  demand: jax.Array
  loads: jax.Array
  load_slots: jax.Array
  table: cache.CacheState | None
  counters: LayerCounters


def _selection(config: MoEConfig, spec: PolicySpec, scores, resident, bias, prior_strength):
  """The model's own top-k, optionally biased toward resident experts (cache_prior).

  The cache prior adds `prior_strength` to the log-scores of resident experts
  before top-k; the engine sets it to log(1 + alpha) unless given, so that a
  resident expert wins over a missing one whose score is below (1 + alpha)
  times its own, and alpha = 0 selects exactly.
  """
  if spec.cache_prior:
    logits = jnp.log(jnp.maximum(scores, 1e-30))
    biased = routing.cache_prior_logits(logits, resident, strength=prior_strength)
    return moe.select_experts(config, jnp.exp(biased), bias)
  return moe.select_experts(config, scores, bias)


def _route(plan: LayerPlan, scores, resident, valid, selected, knobs: Knobs) -> routing.Plan:
  k, spec = plan.config.num_experts_per_tok, plan.spec
  if spec.substitution == "buddy":
    return routing.buddy_route(
      scores,
      resident,
      k=k,
      similarity=knobs.similarity,
      selected=selected,
      valid=valid,
      substitute_weight=plan.substitute_weight,
      alpha=knobs.alpha,
    )
  if spec.substitution in ("score", "similarity"):
    return routing.route(
      scores,
      resident,
      k=k,
      alpha=knobs.alpha,
      selected=selected,
      valid=valid,
      similarity=knobs.similarity if spec.substitution == "similarity" else None,
      substitute_weight=plan.substitute_weight,
    )
  if spec.substitution == "release":
    return routing.release_route(
      scores, resident, k=k, alpha=knobs.alpha, selected=selected, valid=valid, substitute_weight=plan.substitute_weight
    )
  return routing.route(scores, resident, k=k, alpha=0.0, selected=selected, valid=valid)


def _distinct(experts, pair_mask, e):
  """`[E]` bool: experts of the pairs in `pair_mask` `[N, k]`."""
  return jnp.zeros(e, bool).at[experts].max(pair_mask)


def schedule_layer(
  plan: LayerPlan, layer, scores, valid, table, costs: balance.CostModel, arrived, knobs: Knobs
) -> LayerDecision:
  """Plans one MoE layer whose experts live in a slot pool (or on the CPU only: `table` None).

  Args:
    plan: static facts (`LayerPlan`); layer: the decoder layer (its router's selection bias).
    scores: `[N, E]` router scores; valid: `[N]` bool (False = padding).
    table: the pool's `CacheState` after this layer's prefetch, or None without slots.
    costs: running per-expert load / CPU costs (for the balance split).
    arrived: `[E]` bool, experts the prefetch copied in for this layer this step.
    knobs: alpha, the cache-prior strength and the layer's similarity (traced).
  """
  config, spec = plan.config, plan.spec
  e = config.num_experts
  bias = layer.mlp.router.selection_bias()
  resident = jnp.zeros(e, bool) if table is None else cache.resident_mask(table, plan.group)
  selected = _selection(config, spec, scores, resident, bias, knobs.prior_strength)
  routed = _route(plan, scores, resident, valid, selected, knobs)
  mix = moe.combine_weights(config, routed.gate_scores)
  priority = jnp.max(jnp.where(valid[:, None], scores, 0.0), axis=0)

  pair_valid = jnp.broadcast_to(valid[:, None], routed.experts.shape)
  if spec.cpu_compute == "never":
    load = routed.missing
  elif spec.cpu_compute == "always":
    load = jnp.zeros(e, bool)
  elif spec.cpu_compute == "balance":
    load, _ = balance.split_load_cpu(
      jnp.where(routed.missing, priority, -jnp.inf), c_load=costs.load_s, c_cpu=costs.cpu_s
    )
  else:  # "greedy": the released code ranks misses by tokens routed to them (ties: by score, below 1)
    tokens = jnp.zeros(e, jnp.float32).at[routed.experts].add(pair_valid)
    load, _ = balance.greedy_split_load_cpu(
      jnp.where(routed.missing, tokens + priority, -jnp.inf), c_load=costs.load_s, c_cpu=costs.cpu_s
    )

  max_loads = 0 if table is None else min(table.num_slots, e)
  if table is not None and spec.eviction is not None and max_loads > 0:
    table, adm = cache.admit(
      table, load, routed.needed, priority, policy=spec.eviction, max_loads=max_loads, group=plan.group
    )
    loads, load_slots = adm.experts, adm.slots
  else:
    loads = load_slots = jnp.full(max(max_loads, 1), -1, jnp.int32)
  expert_slot = jnp.full(e, -1, jnp.int32) if table is None else cache.expert_slots(table, plan.group)
  pair_slot = expert_slot[routed.experts]
  on_cpu = pair_valid & (pair_slot < 0)
  on_device = pair_valid & ~on_cpu
  slots = jnp.where(on_device, pair_slot, -1)
  if table is not None:
    table = cache.observe(table, scores, routed.needed, valid, group=plan.group)

  was_resident = resident[routed.experts]
  came = arrived[routed.experts]
  classes = (on_device & was_resident & ~came, on_device & came, on_device & ~was_resident, on_cpu)
  top = routed.top_score & pair_valid
  hit = on_device & was_resident
  n_pref, n_pref_top, n_pref_sel = prefetch.prefetch_accuracy(arrived, _distinct(routed.experts, top, e), routed.needed)
  counters = LayerCounters(
    pairs=pair_valid.sum(),
    pairs_resident=classes[0].sum(),
    pairs_prefetch=classes[1].sum(),
    pairs_demand=classes[2].sum(),
    pairs_cpu=classes[3].sum(),
    pairs_top=top.sum(),
    pairs_top_hit=(top & hit).sum(),
    substituted=(routed.substituted & pair_valid).sum(),
    resident_hits=_distinct(routed.experts, classes[0], e).sum(),
    prefetch_hits=_distinct(routed.experts, classes[1], e).sum(),
    demand_loads=_distinct(routed.experts, classes[2], e).sum(),
    cpu_experts=_distinct(routed.experts, classes[3], e).sum(),
    prefetched=n_pref,
    prefetched_top=n_pref_top,
    prefetched_selected=n_pref_sel,
    streamed=jnp.int32(0),
  )
  counters = jax.tree.map(lambda c: jnp.asarray(c, jnp.int32), counters)
  return LayerDecision(routed.experts, mix, top, slots, on_cpu, classes[2], loads, load_slots, table, counters)


def schedule_exact(config: MoEConfig, residency: Residency, layer, scores, valid) -> LayerDecision:
  """The model's own routing with every expert of the layer on the device (slot = expert id).

  For layers whose experts are all on the device in this step: resident ones
  (their pairs are resident hits) and streamed ones (exact prefill, layerwise:
  every expert copied in ahead of the layer, so their pairs are prefetch
  hits). Nothing is substituted, loaded into a cache or computed on the CPU.
  """
  e = config.num_experts
  selected, mix = moe.own_routing(config, scores, layer.mlp.router.selection_bias())
  pair_valid = jnp.broadcast_to(valid[:, None], selected.shape)
  top = jnp.take_along_axis(
    routing.top_score_mask(scores, k=config.num_experts_per_tok, alpha=0.0, selected=selected, valid=valid),
    selected,
    axis=-1,
  )
  slots = jnp.where(pair_valid, selected, -1)
  pairs, used = pair_valid.sum(), _distinct(selected, pair_valid, e).sum()
  resident = residency == Residency.RESIDENT
  zero = jnp.int32(0)
  counters = LayerCounters(
    pairs=pairs,
    pairs_resident=pairs if resident else zero,
    pairs_prefetch=zero if resident else pairs,
    pairs_demand=zero,
    pairs_cpu=zero,
    pairs_top=top.sum(),
    pairs_top_hit=top.sum(),
    substituted=zero,
    resident_hits=used if resident else zero,
    prefetch_hits=zero if resident else used,
    demand_loads=zero,
    cpu_experts=zero,
    prefetched=zero,
    prefetched_top=zero,
    prefetched_selected=zero,
    streamed=jnp.int32(0 if resident else e),
  )
  counters = jax.tree.map(lambda c: jnp.asarray(c, jnp.int32), counters)
  none = jnp.full(1, -1, jnp.int32)
  no_pairs = jnp.zeros(slots.shape, bool)
  return LayerDecision(selected, mix, top, slots, no_pairs, no_pairs, none, none, None, counters)


class PrefetchGate(NamedTuple):
  """When and around what a prefetch may copy: `enabled` (scalar bool; the released code prefetches only after
  the previous layer missed) and `keep` `[G * E]` bool, keys of a shared pool it must not evict (the previous
  layer's experts, still in use), or None."""

  enabled: jax.Array
  keep: jax.Array | None


def prefetch_layer(
  plan: LayerPlan, layer, pred_scores, valid, table: cache.CacheState, alpha, gate: PrefetchGate
) -> tuple[cache.CacheState, cache.Admission, jax.Array]:
  """Admits the layer's predicted top-score experts (or its most activated ones) before its plan.

  Returns (table, admission, arrived `[E]` bool: the experts it copies in).
  """
  config, spec = plan.config, plan.spec
  k, e = config.num_experts_per_tok, config.num_experts
  resident = cache.resident_mask(table, plan.group)
  max_loads = min(table.num_slots, e)
  if spec.prefetch == "activation":
    use_count = jax.lax.dynamic_slice_in_dim(table.use_count, plan.group * e, e)
    want = prefetch.activation_targets(use_count, resident, num=max_loads)
    priority = use_count
  else:
    selected = moe.select_experts(config, pred_scores, layer.mlp.router.selection_bias())
    if spec.prefetch_limit is None:
      want = prefetch.prefetch_targets(pred_scores, resident, k=k, alpha=alpha, valid=valid, selected=selected)
    else:
      want = prefetch.limited_targets(
        pred_scores, resident, k=k, alpha=alpha, max_experts=spec.prefetch_limit, valid=valid, selected=selected
      )
    priority = jnp.max(jnp.where(valid[:, None], pred_scores, 0.0), axis=0)
  table, adm = cache.admit(
    table,
    want & gate.enabled,
    jnp.zeros_like(want),
    priority,
    policy=spec.eviction,
    max_loads=max_loads,
    group=plan.group,
    keep=gate.keep,
  )
  arrived = jnp.zeros(e, bool).at[jnp.where(adm.experts >= 0, adm.experts, e)].set(True, mode="drop")
  return table, adm, arrived
