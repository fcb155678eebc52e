"""`moejax.eval.speed.measure_decode`: the routing figures and oracle bounds for every kind of policy."""

import math

import numpy as np
import pytest

from moejax import Engine
from moejax.eval import speed
from tests.eval.conftest import VOCAB

WINDOWS = np.random.RandomState(0).randint(0, VOCAB, (2, 12))


def measure(host_model, policy, cache_slots, alpha=0.0):
  engine = Engine(host_model, policy=policy, alpha=alpha, cache_slots=cache_slots, record_routing=True)
  return speed.measure_decode(engine, WINDOWS, 4, warmup=False)["measured"]


@pytest.mark.parametrize(("policy", "slots"), [("lru", 2), ("static", 3), ("smoe", 2)])
def test_bounds_cap_the_cache_hits_of_every_cached_policy(host_model, policy, slots):
  m = measure(host_model, policy, slots, alpha=0.3 if policy == "smoe" else 0.0)
  assert 1 <= m["distinct_experts"] <= host_model.config.num_experts and 0 <= m["reuse_rate"] <= 1
  if policy != "smoe":  # no prefetch, no substitution: the Belady bound caps the cache hits
    assert m["cache_hit_ratio"] <= m["belady_hit_ratio"] + 1e-9
  assert m["belady_hit_ratio"] <= m["substitution_bound_hit_ratio"] + 1e-9 <= 1 + 1e-9


def test_no_slots_bound_to_zero_and_no_cache_has_no_bound(host_model):
  cpu = measure(host_model, "cpu", 0)
  assert cpu["hit_ratio"] == 0 and cpu["belady_hit_ratio"] == 0 == cpu["substitution_bound_hit_ratio"]
  resident = measure(host_model, "resident", host_model.config.num_experts)
  assert resident["hit_ratio"] == 1 and math.isnan(resident["belady_hit_ratio"])
