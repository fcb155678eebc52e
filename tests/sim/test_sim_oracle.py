"""Offline caching bounds against a brute-force optimum, hand-worked traces, and the online policies."""

import functools
import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.scheduling import cache
from moejax.sim import LayerRouting, belady, routing_bounds, substitution_bound

NUM_IDS = 5


def brute_force(requests, num_slots, initial, *, bypass, objective):
  """Best (primary, secondary) hits over every schedule of the model in `moejax.sim.oracle`.

  Before each step any subset of the cache is kept (the rest dropped); the
  kept ids that are requested hit; any subset of the misses is admitted
  (all of them with bypass=False) while kept + admitted fit in the slots.
  Scores are (distinct hits, pair hits) for objective "requests" and the
  reverse for "pairs", maximised lexicographically.
  """
  counts = [dict(zip(*np.unique(np.asarray(r, int), return_counts=True), strict=True)) for r in requests]

  @functools.cache
  def best(t, held):
    if t == len(requests):
      return (0, 0)
    out = None
    for n_keep in range(len(held) + 1):
      for keep in itertools.combinations(sorted(held), n_keep):
        hit = set(keep) & set(counts[t])
        score = (len(hit), sum(counts[t][x] for x in hit))
        score = score if objective == "requests" else score[::-1]
        missed = sorted(set(counts[t]) - set(keep))
        choices = (
          [missed] if not bypass else [c for n in range(len(missed) + 1) for c in itertools.combinations(missed, n)]
        )
        for admitted in choices:
          if len(keep) + len(admitted) <= num_slots:
            rest = best(t + 1, frozenset(keep) | frozenset(admitted))
            total = (score[0] + rest[0], score[1] + rest[1])
            out = total if out is None or total > out else out
    return out

  return best(0, frozenset(initial))


@st.composite
def traces(draw, max_steps=6, max_pairs=4, max_slots=3):
  """(requests, num_slots, initial): per step up to `max_pairs` ids below NUM_IDS, repeats allowed."""
  num_slots = draw(st.integers(1, max_slots))
  requests = draw(st.lists(st.lists(st.integers(0, NUM_IDS - 1), max_size=max_pairs), max_size=max_steps))
  initial = draw(st.lists(st.integers(0, NUM_IDS - 1), unique=True, max_size=num_slots))
  return requests, num_slots, initial


def fit(requests, num_slots):
  """Each step cut to the pairs of its first `num_slots` distinct ids (demand paging must hold them all)."""
  out = []
  for r in requests:
    first = list(dict.fromkeys(r))[:num_slots]
    out.append([x for x in r if x in first])
  return out


@settings(max_examples=150, deadline=None)
@given(traces(), st.booleans(), st.sampled_from(["requests", "pairs"]))
def test_belady_equals_the_brute_force_optimum(trace, bypass, objective):
  requests, num_slots, initial = trace
  if not bypass:
    requests = fit(requests, num_slots)
  bound = belady(requests, num_slots, initial=initial, bypass=bypass, objective=objective)
  got = (bound.hits, bound.pair_hits) if objective == "requests" else (bound.pair_hits, bound.hits)
  assert got == brute_force(requests, num_slots, initial, bypass=bypass, objective=objective)
  assert bound.requests == sum(len(set(r)) for r in requests)
  assert bound.pairs == sum(len(r) for r in requests)
  assert bound.hit_ratio == (bound.pair_hits / bound.pairs if bound.pairs else 0.0)


def test_keeping_the_soonest_next_request_is_not_optimal_with_bypass():
  # S = 1. Both ids are next requested at step 1; keeping 0 (ties by id) hits 0 at
  # steps 1 and 2 (2 hits); keeping 1 hits it at steps 1, 2 and 3 (3 hits), 1 load.
  requests = [[0, 1], [0, 1], [0, 1], [1]]
  bound = belady(requests, 1)
  assert (bound.hits, bound.loads) == (3, 1)
  assert brute_force(requests, 1, (), bypass=True, objective="requests")[0] == 3


def test_demand_paging_and_bypass_by_hand():
  # S = 2, requests 0 1 2 0 1 3 0. Demand paging: 2 evicts 1 (next used later than 0);
  # 0 hits; 1 evicts 2; 3 evicts 1; 0 hits: 2 hits, 5 loads (every miss).
  # With bypass 2 and 3 skip the cache: 0, 1, 0 hit: 3 hits, 2 loads.
  requests = [[0], [1], [2], [0], [1], [3], [0]]
  assert belady(requests, 2, bypass=False)[:5] == (2, 7, 2, 7, 5)
  assert belady(requests, 2, bypass=True)[:5] == (3, 7, 3, 7, 2)
  # The initial cache counts: starting with {0, 1} under bypass, 0 and 1 hit at steps 0 and 1 too.
  assert belady(requests, 2, initial=[0, 1]).hits == 5


def test_objectives_differ_when_a_step_has_several_tokens():
  # S = 1. Keeping 0 hits its 3 pairs at step 1 but blocks 1 there (a hit holds its
  # slot through its step): 2 hits, 4 pairs. Keeping 1 hits it at steps 1, 2, 3: 3 hits, 3 pairs.
  requests = [[0, 1], [0, 0, 0, 1], [1], [1]]
  by_requests, by_pairs = belady(requests, 1), belady(requests, 1, objective="pairs")
  assert (by_requests.hits, by_requests.pair_hits) == (3, 3)
  assert (by_pairs.hits, by_pairs.pair_hits) == (2, 4)


def test_errors_name_the_fix():
  with pytest.raises(ValueError, match=r"step 1 .*3 distinct ids.*num_slots=2"):
    belady([[0], [0, 1, 2]], 2, bypass=False)
  with pytest.raises(ValueError, match="initial"):
    belady([[0]], 1, initial=[0, 1])
  with pytest.raises(ValueError, match="num_slots"):
    belady([[0]], 0)
  with pytest.raises(ValueError, match="objective"):
    belady([[0]], 1, objective="bytes")
  with pytest.raises(ValueError, match=">= 0"):
    belady([[-1]], 1)


# Replaying the online policies of moejax.scheduling.cache on the same requests.
admit = jax.jit(cache.admit, static_argnames=("policy", "max_loads"))
observe = jax.jit(cache.observe)


def replay(policy, requests, num_slots, initial, admit_miss):
  """(distinct hits, pair hits) of `policy` driven through init_cache_state / admit / observe.

  Per step: requested ids resident before the step hit (and are shielded);
  the misses that `admit_miss(t)` (`[E] bool`) selects are admitted, evicting
  by the policy; the step's gate scores are its ids' pair shares.
  """
  slots = np.full(num_slots, -1, np.int32)
  slots[: len(initial)] = initial
  state = cache.init_cache_state(NUM_IDS, num_slots, initial_experts=slots)
  hits = pair_hits = 0
  for t, r in enumerate(requests):
    counts = np.bincount(np.asarray(r, int), minlength=NUM_IDS)
    need = counts > 0
    hit = need & np.asarray(cache.resident_mask(state))
    hits, pair_hits = hits + int(hit.sum()), pair_hits + int(counts[hit].sum())
    want = hit | (need & ~hit & admit_miss(t))
    state, _ = admit(state, want, hit, policy=policy, max_loads=NUM_IDS)
    scores = (counts / max(counts.sum(), 1)).astype(np.float32)[None]
    state = observe(state, scores, need)
  return hits, pair_hits


def test_replay_counts_lru_by_hand():
  # S = 2, requests 0 1 2 0: LRU evicts 0 for 2, so 0 misses again: no hit.
  # The optimum evicts 1 and hits 0.
  requests = [[0], [1], [2], [0]]
  assert replay("lru", requests, 2, [], lambda t: np.ones(NUM_IDS, bool)) == (0, 0)
  assert belady(requests, 2, bypass=False).hits == 1


@pytest.mark.parametrize("policy", cache.EVICTION_POLICIES)
@settings(max_examples=40, deadline=None)
@given(trace=traces(max_steps=8), data=st.data())
def test_belady_bounds_every_online_policy(policy, trace, data):
  requests, num_slots, initial = trace
  # Demand paging: every miss admitted.
  demand = fit(requests, num_slots)
  hits, pair_hits = replay(policy, demand, num_slots, initial, lambda t: np.ones(NUM_IDS, bool))
  assert belady(demand, num_slots, initial=initial, bypass=False).hits >= hits
  assert belady(demand, num_slots, initial=initial, bypass=False, objective="pairs").pair_hits >= pair_hits
  # Random misses go elsewhere (the CPU).
  masks = data.draw(
    st.lists(
      st.lists(st.booleans(), min_size=NUM_IDS, max_size=NUM_IDS), min_size=len(requests), max_size=len(requests)
    )
  )
  hits, pair_hits = replay(policy, requests, num_slots, initial, lambda t: np.array(masks[t]))
  assert belady(requests, num_slots, initial=initial).hits >= hits
  assert belady(requests, num_slots, initial=initial, objective="pairs").pair_hits >= pair_hits


def test_substitution_bound_by_hand():
  # S = 1, top-score ids 0 | 1 | 0 and 2, 0, 1 low-score pairs: the top pairs hit once
  # (0 kept through step 1, where 1 goes elsewhere), the 3 low pairs count as hits: 4 of 6.
  bound = substitution_bound([[0], [1], [0]], [2, 0, 1], 1)
  assert (bound.hits, bound.requests, bound.pair_hits, bound.pairs, bound.loads) == (4, 6, 4, 6, 1)
  assert bound.hit_ratio == pytest.approx(4 / 6)
  with pytest.raises(ValueError, match="low_pairs"):
    substitution_bound([[0], [1]], [1], 1)
  with pytest.raises(ValueError, match="low_requests"):
    substitution_bound([[0]], [2], 1, low_requests=[[1]])


def test_low_requests_keep_the_pair_bound_valid_for_batches():
  # S = 1. Step 0 computes id 5 for one low-score pair; step 1 routes 3 tokens to 5 as
  # top-score. A schedule admitting 5 at step 0 hits 3 pairs at step 1; counting the
  # low pair as a hit but never admitting there would give 1 pair, below that.
  full = belady([[5], [5, 5, 5]], 1, objective="pairs")
  assert full.pair_hits == 3
  assert substitution_bound([[], [5, 5, 5]], [1, 0], 1, objective="pairs").pair_hits == 1
  bound = substitution_bound([[], [5, 5, 5]], [1, 0], 1, low_requests=[[5], []], objective="pairs")
  assert bound.pair_hits == 4 and bound.pairs == 4


@settings(max_examples=100, deadline=None)
@given(traces(), st.data())
def test_substitution_bound_is_at_least_belady_on_the_full_requests(trace, data):
  top, num_slots, initial = trace
  low = [data.draw(st.lists(st.integers(0, NUM_IDS - 1), max_size=3)) for _ in top]
  full = [t + lo for t, lo in zip(top, low, strict=True)]
  counts = [len(lo) for lo in low]
  assert (
    substitution_bound(top, counts, num_slots, initial=initial).hits >= belady(full, num_slots, initial=initial).hits
  )
  pairs = substitution_bound(top, counts, num_slots, initial=initial, low_requests=low, objective="pairs")
  assert pairs.pair_hits >= belady(full, num_slots, initial=initial, objective="pairs").pair_hits


def _routing():
  """Two decode steps of MoE layers 3 and 5 (E = 4, one token, top-2)."""
  lr = lambda experts, top: LayerRouting(np.array([experts], np.int32), np.array([top], bool))
  return [
    {3: lr([0, 1], [True, False]), 5: lr([2, 3], [True, True])},
    {3: lr([0, 2], [True, True]), 5: lr([2, 3], [True, False])},
  ]


def test_routing_bounds_per_layer_by_hand():
  # S = 1 per layer. Layer 3: {0, 1} then {0, 2}: keep 0, 1 hit of 4 pairs; layer 5:
  # {2, 3} twice: 1 hit of 4; one load each. Substitution: layer 3's top ids 0 | 0, 2
  # hit once, plus its 1 low pair; layer 5's top ids 2, 3 | 2 hit once, plus 1 low pair.
  out = routing_bounds(_routing(), 1, num_experts=4)
  assert out == {"belady_hit_ratio": 2 / 8, "belady_loads": 2, "substitution_bound_hit_ratio": 4 / 8, "pairs": 8}
  # Layer 3 starts holding 0: both its requests of 0 hit, no load there.
  out = routing_bounds(_routing(), 1, num_experts=4, initial={3: [0]})
  assert (out["belady_hit_ratio"], out["belady_loads"]) == (3 / 8, 1)


def test_routing_bounds_one_global_pool_by_hand():
  # Ids layer_index * 4 + expert, in (step, layer) order: {0, 1}, {6, 7}, {0, 2}, {6, 7}.
  # S = 3: admit 0, then 6 and 7 beside it; 0 hits at the third request (2 goes elsewhere),
  # 6 and 7 at the fourth: 3 hits of 8 pairs, 3 loads. Substitution: the top-score
  # requests 0 | 6, 7 | 0, 2 | 6 hit 0 and 6 (2), plus 2 low pairs: 4 of 8.
  out = routing_bounds(_routing(), 3, num_experts=4, scope="global")
  assert out == {"belady_hit_ratio": 3 / 8, "belady_loads": 3, "substitution_bound_hit_ratio": 4 / 8, "pairs": 8}
  # The same pool starting with layer 5's experts 2 and 3 (ids 6, 7): they hit at both steps.
  out = routing_bounds(_routing(), 3, num_experts=4, scope="global", initial=[6, 7])
  assert out["belady_hit_ratio"] == 5 / 8


def test_routing_bounds_check_their_input():
  bad = [{3: LayerRouting(np.array([[0, 4]], np.int32), np.array([[True, True]]))}]
  with pytest.raises(ValueError, match="num_experts=4"):
    routing_bounds(bad, 1, num_experts=4)
  bad = [{3: LayerRouting(np.array([[0, 1]], np.int32), np.array([True, True]))}]
  with pytest.raises(ValueError, match=r"\[N, k\]"):
    routing_bounds(bad, 1, num_experts=4)
  with pytest.raises(ValueError, match="scope"):
    routing_bounds(_routing(), 1, num_experts=4, scope="model")
