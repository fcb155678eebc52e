"""One jitted scheduling decision per MoE layer and step.

`schedule_layer` turns a layer's router scores into everything the engine
needs before expert compute: the plan (experts per token after substitution),
mixing weights, which experts to copy into which slots (with eviction), which
token-expert pairs run on the CPU, the updated cache state and counters. It is
pure: the engine calls it once per layer and fetches its small outputs in one
transfer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.models import moe
from moejax.models.config import MoEConfig
from moejax.scheduling import balance, cache, prefetch, routing
from moejax.scheduling.policies import PolicySpec

# Indices of the counters vector returned by `schedule_layer`.
COUNTERS = (
    "pairs",  # valid token-expert pairs computed
    "pairs_hit",  # of which the expert was resident at plan time
    "pairs_top",  # pairs holding a top-score expert
    "pairs_top_hit",
    "substituted",  # pairs whose expert was substituted
    "hits",  # distinct device experts resident at plan time, not prefetched for this layer
    "prefetch_used",  # distinct device experts prefetched for this layer and computed
    "demand_loads",  # distinct experts copied after the plan
    "cpu_experts",  # distinct experts computed on the CPU
    "gpu_pairs",
    "cpu_pairs",
    "prefetched",  # experts prefetched for this layer
    "prefetched_top",  # of which top-score for some token
    "prefetched_selected",  # of which selected by some token
)


class LayerDecision(NamedTuple):
  """What one layer's scheduling decided (all device arrays).

  experts `[N, k]` ids computed per token, mix `[N, k]` mixing weights,
  slots `[N, k]` device slot per pair (-1: not on the device), on_cpu `[N, k]`,
  loads / load_slots `[M]` experts to copy and their slots (-1 padded),
  state: the layer's updated `CacheState` (None without a cache),
  counters `[len(COUNTERS)]` int32.
  """

  experts: jax.Array
  mix: jax.Array
  slots: jax.Array
  on_cpu: jax.Array
  loads: jax.Array
  load_slots: jax.Array
  state: cache.CacheState | None
  counters: jax.Array


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


def schedule_layer(
    config: MoEConfig,
    spec: PolicySpec,
    substitute_weight: str,
    scores: jax.Array,
    valid: jax.Array,
    state: cache.CacheState | None,
    costs: balance.CostModel,
    alpha: jax.Array,
    similarity: jax.Array | None,
    bias: jax.Array | None,
    prefetched: jax.Array,
    prior_strength: jax.Array,
) -> LayerDecision:
  """Plans one MoE layer.

  Args:
    config, spec, substitute_weight: static.
    scores: `[N, E]` router scores; valid: `[N]` bool (False = padding).
    state: the layer's `CacheState`, or None when the policy keeps no cache.
    costs: running per-expert load / CPU costs (for the balance split).
    alpha: substitution threshold (traced).
    similarity: `[E, E]` for similarity or buddy substitution, else None.
    bias: router selection bias (DeepSeek-V3) or None.
    prefetched: `[E]` bool, experts prefetched for this layer this step.
    prior_strength: cache_prior logit bias (traced).
  """
  k, e = config.num_experts_per_tok, config.num_experts
  resident = jnp.zeros(e, bool) if state is None else cache.resident_mask(state)
  selected = _selection(config, spec, scores, resident, bias, prior_strength)
  if spec.substitution == "buddy":
    plan = routing.buddy_route(
        scores, resident, k=k, similarity=similarity, selected=selected, valid=valid,
        substitute_weight=substitute_weight, alpha=alpha,
    )
  elif spec.substitution in ("score", "similarity"):
    plan = routing.route(
        scores, resident, k=k, alpha=alpha, selected=selected, valid=valid,
        similarity=similarity if spec.substitution == "similarity" else None,
        substitute_weight=substitute_weight,
    )
  else:
    plan = routing.route(scores, resident, k=k, alpha=0.0, selected=selected, valid=valid)
  mix = moe.combine_weights(config, plan.gate_scores)
  priority = jnp.max(jnp.where(valid[:, None], scores, 0.0), axis=0)

  if spec.cpu_compute == "never":
    load = plan.missing
  elif spec.cpu_compute == "always":
    load = jnp.zeros(e, bool)
  else:
    load, _ = balance.split_load_cpu(
        jnp.where(plan.missing, priority, -jnp.inf), c_load=costs.load_s, c_cpu=costs.cpu_s
    )

  max_loads = 0 if state is None else min(state.num_slots, e)
  if state is not None and spec.eviction is not None and max_loads > 0:
    state, adm = cache.admit(state, load, plan.needed, priority, policy=spec.eviction, max_loads=max_loads)
    loads, load_slots = adm.experts, adm.slots
  else:
    loads = load_slots = jnp.full(max(max_loads, 1), -1, jnp.int32)
  expert_slot = jnp.full(e, -1, jnp.int32) if state is None else state.expert_slot
  pair_slot = expert_slot[plan.experts]
  pair_valid = jnp.broadcast_to(valid[:, None], plan.experts.shape)
  on_cpu = pair_valid & (pair_slot < 0)
  slots = jnp.where(pair_valid & ~on_cpu, pair_slot, -1)
  if state is not None:
    state = cache.observe(state, scores, plan.needed, valid)

  # Counters.
  def distinct(pair_mask):
    return jnp.zeros(e, bool).at[plan.experts].max(pair_mask & pair_valid)

  on_device = distinct(~on_cpu)
  loaded = jnp.zeros(e, bool).at[jnp.where(loads >= 0, loads, e)].set(True, mode="drop")
  was_resident = resident[plan.experts]
  top = plan.top_score & pair_valid
  top_experts = distinct(plan.top_score)
  n_pref, n_pref_top, n_pref_sel = prefetch.prefetch_accuracy(prefetched, top_experts, plan.needed)
  counters = jnp.stack([
      pair_valid.sum(),
      (was_resident & pair_valid).sum(),
      top.sum(),
      (was_resident & top).sum(),
      (plan.substituted & pair_valid).sum(),
      (on_device & resident & ~prefetched).sum(),
      (on_device & resident & prefetched).sum(),
      (on_device & loaded & ~resident).sum(),
      distinct(on_cpu).sum(),
      (pair_valid & ~on_cpu).sum(),
      on_cpu.sum(),
      n_pref,
      n_pref_top,
      n_pref_sel,
  ]).astype(jnp.int32)
  return LayerDecision(plan.experts, mix, slots, on_cpu, loads, load_slots, state, counters)


def schedule_exact(config: MoEConfig, scores: jax.Array, valid: jax.Array, state: cache.CacheState | None,
                   bias: jax.Array | None) -> LayerDecision:
  """The model's own routing with every expert of the layer on the device (slot = expert id).

  For steps that stream a whole layer in (exact prefill, layerwise policy):
  nothing is substituted, loaded into the cache or computed on the CPU, and
  the cache state passes through unchanged. Counters are zeros; the engine
  counts these layers from the selected experts.
  """
  selected, mix = moe.own_routing(config, scores, bias)
  none = jnp.full(1, -1, jnp.int32)
  slots = jnp.where(valid[:, None], selected, -1)
  return LayerDecision(selected, mix, slots, jnp.zeros(slots.shape, bool), none, none, state,
                       jnp.zeros(len(COUNTERS), jnp.int32))


def prefetch_layer(
    config: MoEConfig,
    spec: PolicySpec,
    pred_scores: jax.Array,
    valid: jax.Array,
    state: cache.CacheState,
    alpha: jax.Array,
    bias: jax.Array | None,
) -> tuple[cache.CacheState, cache.Admission, jax.Array]:
  """Admits the next layer's predicted top-score experts (or most activated ones).

  Returns (state, admission, prefetched `[E]` bool).
  """
  k = config.num_experts_per_tok
  resident = cache.resident_mask(state)
  max_loads = min(state.num_slots, config.num_experts)
  if spec.prefetch == "activation":
    want = prefetch.activation_targets(state.use_count, resident, num=max_loads)
    priority = state.use_count
  else:
    selected = moe.select_experts(config, pred_scores, bias)
    want = prefetch.prefetch_targets(pred_scores, resident, k=k, alpha=alpha, valid=valid, selected=selected)
    priority = jnp.max(jnp.where(valid[:, None], pred_scores, 0.0), axis=0)
  state, adm = cache.admit(state, want, jnp.zeros_like(want), priority, policy=spec.eviction, max_loads=max_loads)
  prefetched = jnp.zeros(config.num_experts, bool).at[jnp.where(adm.experts >= 0, adm.experts, config.num_experts)].set(
      True, mode="drop"
  )
  return state, adm, prefetched
