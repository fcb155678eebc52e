"""Pure, jittable scheduling functions and their state pytrees.

Modules:
  routing: the expert-cache router (substitution), BuddyMoE and
    cache-conditional routing rules.
  cache: per-layer expert-cache state, statistics, admission and eviction.
  balance: two-pointer split of misses between loading and CPU compute.
  prefetch: next-layer prefetch targets and accuracy counters.
  similarity: expert similarity matrices that rank substitutes.
  policies: named policies as combinations of these components.
"""

from moejax.scheduling.balance import CostModel, init_cost_model, split_load_cpu, update_costs
from moejax.scheduling.cache import (
  EVICTION_POLICIES,
  Admission,
  CacheState,
  admit,
  eviction_key,
  init_cache_state,
  observe,
  resident_mask,
  window_score,
)
from moejax.scheduling.policies import ABLATION, POLICIES, PolicySpec, get_policy
from moejax.scheduling.prefetch import activation_targets, prefetch_accuracy, prefetch_targets
from moejax.scheduling.routing import Plan, buddy_route, cache_prior_logits, route, top_score_mask
from moejax.scheduling.similarity import (
  SIMILARITY_SOURCES,
  coactivation,
  expert_output_similarity,
  expert_weight_cosine,
  load_similarity,
  router_cosine,
  save_similarity,
)

__all__ = [
  "ABLATION",
  "EVICTION_POLICIES",
  "POLICIES",
  "SIMILARITY_SOURCES",
  "Admission",
  "CacheState",
  "CostModel",
  "Plan",
  "PolicySpec",
  "activation_targets",
  "admit",
  "buddy_route",
  "cache_prior_logits",
  "coactivation",
  "eviction_key",
  "expert_output_similarity",
  "expert_weight_cosine",
  "get_policy",
  "init_cache_state",
  "init_cost_model",
  "load_similarity",
  "observe",
  "prefetch_accuracy",
  "prefetch_targets",
  "resident_mask",
  "route",
  "router_cosine",
  "save_similarity",
  "split_load_cpu",
  "top_score_mask",
  "update_costs",
  "window_score",
]
