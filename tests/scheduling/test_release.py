"""Tests of the paper's released-code rules (docs/smoe_release.md): substitution, the greedy
load/CPU split and the limited prefetch, against hand-worked cases and plain-Python
transcriptions of the released code's loops."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.scheduling import balance, prefetch, routing

SETTINGS = hypothesis.settings(max_examples=50, deadline=None)

release_route = jax.jit(routing.release_route, static_argnames=("k", "substitute_weight"))
route = jax.jit(routing.route, static_argnames=("k", "substitute_weight"))
greedy = jax.jit(balance.greedy_split_load_cpu)
NEG = -np.inf


def mask(num_experts, ids):
  return jnp.zeros(num_experts, bool).at[jnp.array(ids, jnp.int32)].set(True)


def rows(*lists):
  return jnp.array(lists, jnp.float32)


def flat(m):
  return np.flatnonzero(np.asarray(m)).tolist()


# --------------------------------------------------------------------------
# Substitution.
# --------------------------------------------------------------------------

# One token, E = 6, k = 2, alpha = 0.5: selected [0, 1], S_(k+1) = 0.18 (expert 2).
#   top-score (closed): S >= 1.5 * 0.18 = 0.27 -> expert 0; expert 1 (0.22) is low-score.
#   open window 0.09 < S < 0.18 -> experts 3 (0.10) and 4 (0.15); not 2 (the runner-up, 0.18).
TOKEN = rows([0.30, 0.22, 0.18, 0.10, 0.15, 0.05])


def test_open_window_excludes_the_runner_up():
  # Only the runner-up 2 is resident: route (closed window) substitutes it, the release cannot.
  np.testing.assert_array_equal(route(TOKEN, mask(6, [2]), k=2, alpha=0.5).experts, [[0, 2]])
  plan = release_route(TOKEN, mask(6, [2]), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 1]])
  np.testing.assert_array_equal(flat(plan.missing), [0, 1])
  # The window floor is open too: with alpha = 0.5 and S_(k+1) = 0.2 the floor is exactly 0.1.
  scores = rows([0.5, 0.25, 0.2, 0.1, 0.15])
  np.testing.assert_array_equal(release_route(scores, mask(5, [3]), k=2, alpha=0.5).experts, [[0, 1]])
  np.testing.assert_array_equal(route(scores, mask(5, [3]), k=2, alpha=0.5).experts, [[0, 3]])


def test_first_eligible_candidate_by_id_not_by_score():
  # Resident {3, 4}: both in the window. route takes the best score, 4 (0.15); the release the
  # first by expert id, 3 (0.10), which contributes its own score.
  np.testing.assert_array_equal(route(TOKEN, mask(6, [3, 4]), k=2, alpha=0.5).experts, [[0, 4]])
  plan = release_route(TOKEN, mask(6, [3, 4]), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 3]])
  np.testing.assert_allclose(plan.gate_scores, [[0.30, 0.10]])
  np.testing.assert_array_equal(plan.substituted, [[False, True]])
  np.testing.assert_array_equal(plan.replaced, [[0, 1]])
  np.testing.assert_array_equal(plan.top_score, [[True, False]])
  np.testing.assert_array_equal(flat(plan.missing), [0])
  plan = release_route(TOKEN, mask(6, [3, 4]), k=2, alpha=0.5, substitute_weight="replaced")
  np.testing.assert_allclose(plan.gate_scores, [[0.30, 0.22]])


def test_each_candidate_once_in_descending_score_order():
  # k = 3, alpha = 0.7: selected [0, 1, 2], S_(k+1) = 0.17 (expert 3). Closed top-score S >=
  # 0.289 -> expert 0; low-score 1 (0.20) and 2 (0.19). Open window 0.051 < S < 0.17 -> 4, 5.
  # Resident {3, 4, 5}: expert 1 first takes 4 (3 is the runner-up), expert 2 then 5.
  scores = rows([0.30, 0.20, 0.19, 0.17, 0.08, 0.06])
  plan = release_route(scores, mask(6, [3, 4, 5]), k=3, alpha=0.7)
  np.testing.assert_array_equal(plan.experts, [[0, 4, 5]])
  # Only 4 resident: expert 1 takes it, expert 2 finds nothing left and is a miss.
  plan = release_route(scores, mask(6, [4]), k=3, alpha=0.7)
  np.testing.assert_array_equal(plan.experts, [[0, 4, 2]])
  np.testing.assert_array_equal(flat(plan.missing), [0, 2])
  # A resident low-score expert is kept.
  plan = release_route(scores, mask(6, [1, 4]), k=3, alpha=0.7)
  np.testing.assert_array_equal(plan.experts, [[0, 1, 4]])


def test_batch_top_score_experts_are_available():
  # Token 1: selected [3, 4], S_(k+1) = 0.05, both top-score (>= 0.075): computed anyway. Nothing
  # is resident; token 0's low-score expert 1 takes the first of the available candidates 3 and 4
  # by id: 3 (route would take 4, the higher score).
  scores = jnp.concatenate([TOKEN, rows([0.05, 0.05, 0.05, 0.60, 0.20, 0.05])])
  plan = release_route(scores, mask(6, []), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 3], [3, 4]])
  np.testing.assert_array_equal(flat(plan.missing), [0, 3, 4])
  np.testing.assert_array_equal(route(scores, mask(6, []), k=2, alpha=0.5).experts, [[0, 4], [3, 4]])
  # A padding token provides no candidates (the release has no padding mask; moejax leaves it out).
  plan = release_route(scores, mask(6, []), k=2, alpha=0.5, valid=jnp.array([True, False]))
  np.testing.assert_array_equal(plan.experts, [[0, 1], [3, 4]])
  np.testing.assert_array_equal(flat(plan.needed), [0, 1])


def test_closed_top_score_threshold():
  # Dyadic, exact in float32, alpha = 1.
  # Token 0 selects [0, 1], S_(k+1) = 0.125, bound 0.25: expert 1 (0.25) is top-score for the
  # release (S >= 0.25), so it is computed anyway and available to the batch.
  # Token 1 selects [3, 4], S_(k+1) = 0.15625 (expert 0), bound 0.3125: expert 4 (0.1875) is
  # low-score; the open window (0, 0.15625) holds 1, 2 and 5, and of those only 1 is available.
  scores = rows([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], [0.15625, 0.125, 0.0625, 0.5, 0.1875, 0.0625])
  plan = release_route(scores, mask(6, []), k=2, alpha=1.0)
  np.testing.assert_array_equal(plan.top_score, [[True, True], [True, False]])
  np.testing.assert_array_equal(plan.experts, [[0, 1], [3, 1]])
  # Under SPEC's strict threshold expert 1 is not top-score for token 0.
  np.testing.assert_array_equal(route(scores, mask(6, []), k=2, alpha=1.0).top_score, [[True, False], [True, False]])
  # With token 0 padding nothing is available and expert 4 stays a miss.
  plan = release_route(scores, mask(6, []), k=2, alpha=1.0, valid=jnp.array([False, True]))
  np.testing.assert_array_equal(plan.experts, [[0, 1], [3, 4]])


def test_alpha_zero_with_ties_is_exact():
  # selected [0, 1]; expert 1 ties S_(k+1) = 0.2 and is top-score (0.2 >= 0.2); the window
  # (0.2, 0.2) is empty anyway.
  plan = release_route(rows([0.4, 0.2, 0.2, 0.2]), mask(4, [2, 3]), k=2, alpha=0.0)
  np.testing.assert_array_equal(plan.experts, [[0, 1]])
  assert plan.top_score.all() and not plan.substituted.any()


def test_selected_expert_below_runner_up_is_kept():
  # A biased router's selection [0, 2, 3] (see test_routing.BIASED): S_(k+1) = 0.20. Expert 3
  # (0.15) is not low-score: kept, although 5 (0.12) is a resident candidate.
  scores = rows([0.32, 0.01, 0.25, 0.15, 0.20, 0.12])
  selected = jnp.array([[0, 2, 3]], jnp.int32)
  plan = release_route(scores, mask(6, [5]), k=3, alpha=0.5, selected=selected)
  np.testing.assert_array_equal(plan.experts, [[0, 5, 3]])
  plan = release_route(scores, mask(6, [5]), k=3, alpha=0.0, selected=selected)
  np.testing.assert_array_equal(plan.experts, [[0, 2, 3]])


def test_user_errors():
  with pytest.raises(ValueError, match="alpha=0"):
    routing.release_route(TOKEN, mask(6, []), k=2, alpha=-0.25)
  with pytest.raises(ValueError, match="substitute_weight"):
    routing.release_route(TOKEN, mask(6, []), k=2, alpha=0.25, substitute_weight="mean")


def reference_release_route(scores, resident, k, alpha):
  """The released code's `replaceset_between_tokens` + `cache_router` as plain Python (float64,
  like the release), with the candidate set iterated in ascending id instead of set order.

  Returns the experts per token, [T, k] in descending score order of the original selection.
  """
  scores = np.asarray(scores, np.float64)
  num_tokens, num_experts = scores.shape
  order = [sorted(range(num_experts), key=lambda e: -s[e]) for s in scores]  # stable: ties by id
  replaceset = set()
  for t in range(num_tokens):
    mid = scores[t, order[t][k]]
    replaceset |= {e for e in order[t][:k] if scores[t, e] >= mid + alpha * mid}
  out = []
  for t in range(num_tokens):
    mid = scores[t, order[t][k]]
    high, low = mid + alpha * mid, mid - alpha * mid
    chosen = [None] * k
    n_top = 0
    candidates = []
    for i, e in enumerate(order[t]):
      if scores[t, e] >= high and i < k:
        chosen[i] = e
        n_top += 1
      elif low < scores[t, e] < mid:
        candidates.append(e)
    candidates.sort()
    for i in range(n_top, k):
      e = order[t][i]
      chosen[i] = e
      if resident[e] or e in replaceset:
        continue
      for c in candidates:
        if (resident[c] or c in replaceset) and c not in chosen:
          chosen[i] = c
          candidates.remove(c)
          break
    out.append(chosen)
  return np.array(out)


@SETTINGS
@hypothesis.given(
  seed=st.integers(0, 2**32 - 1),
  shape=st.sampled_from([(1, 8, 2), (4, 12, 3), (3, 6, 4)]),
  alpha=st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0, 2.0]),
  dyadic=st.booleans(),
)
def test_release_route_matches_transcription(seed, shape, alpha, dyadic):
  # Dyadic scores and alphas make ties and exact threshold hits common and keep float32 (moejax)
  # and float64 (the release) thresholds identical.
  t, e, k = shape
  rng = np.random.default_rng(seed)
  if dyadic:
    scores = rng.integers(1, 16, (t, e)) / 64.0
  else:
    logits = rng.normal(size=(t, e)) * rng.uniform(0.5, 3.0)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  scores = scores.astype(np.float32)
  resident = rng.random(e) < rng.uniform(0, 1)
  plan = release_route(jnp.asarray(scores), jnp.asarray(resident), k=k, alpha=alpha)
  expected = reference_release_route(scores, resident, k, alpha)
  # Both keep the top-k positions in descending score order (ties: lower id first).
  np.testing.assert_array_equal(plan.replaced, np.array([sorted(range(e), key=lambda x: -s[x])[:k] for s in scores]))
  np.testing.assert_array_equal(plan.experts, expected)
  if alpha == 0.0:
    np.testing.assert_array_equal(plan.experts, plan.replaced)


# --------------------------------------------------------------------------
# The greedy load/CPU split.
# --------------------------------------------------------------------------


def reference_greedy(keys, valid, c_load, c_cpu):
  """`CPU_load_management` of the released code: rank by key (stable sort), then one pass."""
  present = [i for i in range(len(keys)) if valid[i] and keys[i] != NEG]
  ranked = sorted(present, key=lambda i: -keys[i])
  load, cpu = set(), set()
  t_load = t_cpu = np.float32(0)
  for i in ranked:
    if t_load < t_cpu:
      load.add(i)
      t_load = t_load + np.float32(c_load)
    else:
      cpu.add(i)
      t_cpu = t_cpu + np.float32(c_cpu)
  return load, cpu


def test_first_miss_goes_to_the_cpu():
  load, cpu = greedy(jnp.array([0.5, NEG, NEG]), c_load=1e-3, c_cpu=1.0)
  assert flat(load) == [] and flat(cpu) == [0]


def test_greedy_load_twice_as_slow():
  # Keys of experts a..e: 0.5 > 0.4 > 0.3 > 0.2 > 0.1, given unsorted, with absent entries.
  # c_load = 2, c_cpu = 1; (t_load, t_cpu) before each expert, in rank order:
  #   (0, 0): 0 < 0 no  -> cpu a   -> (0, 1)
  #   (0, 1): 0 < 1 yes -> load b  -> (2, 1)
  #   (2, 1): no        -> cpu c   -> (2, 2)
  #   (2, 2): no        -> cpu d   -> (2, 3)
  #   (2, 3): yes       -> load e  -> (4, 3)
  # load {b, e}, cpu {a, c, d}. The two-pointer split of SPEC loads {a, b} instead.
  #          a    d    -    c    e    b    (invalid)
  keys = jnp.array([0.5, 0.2, NEG, 0.3, 0.1, 0.4, 0.9])
  valid = jnp.array([True] * 6 + [False])
  load, cpu = greedy(keys, valid, c_load=2.0, c_cpu=1.0)
  assert flat(load) == [4, 5] and flat(cpu) == [0, 1, 3]
  load, _ = balance.split_load_cpu(keys, valid, c_load=2.0, c_cpu=1.0)
  assert flat(load) == [0, 5]


def test_greedy_equal_costs_alternate_from_the_cpu():
  # Equal costs (the release's state before a layer has two CPU measurements): cpu, load, cpu, ...
  load, cpu = greedy(jnp.array([5.0, 4, 3, 2, 1]), c_load=1.0, c_cpu=1.0)
  assert flat(load) == [1, 3] and flat(cpu) == [0, 2, 4]


def test_greedy_ties_go_to_the_lower_index():
  # All keys equal (one token per missed expert in decode): rank = index order.
  load, cpu = greedy(jnp.ones(4), c_load=1.0, c_cpu=3.0)
  # (0,0) cpu 0 -> (0,3) load 1 -> (1,3) load 2 -> (2,3) load 3.
  assert flat(load) == [1, 2, 3] and flat(cpu) == [0]


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
  seed=st.integers(0, 2**32 - 1),
  c_load=st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0, 1e-3]),
  c_cpu=st.sampled_from([0.25, 0.5, 1.0, 2.0, 7.0, 3e-3]),
)
def test_greedy_matches_reference(seed, c_load, c_cpu):
  rng = np.random.default_rng(seed)
  keys = rng.integers(0, 5, 12).astype(np.float32)  # ties included
  keys[rng.random(12) < 0.3] = NEG
  valid = rng.random(12) < 0.8
  load, cpu = greedy(jnp.asarray(keys), jnp.asarray(valid), c_load=c_load, c_cpu=c_cpu)
  assert (set(flat(load)), set(flat(cpu))) == reference_greedy(keys, valid, c_load, c_cpu)


# --------------------------------------------------------------------------
# The limited prefetch.
# --------------------------------------------------------------------------


def test_limited_targets():
  # Token 0: top-2 {0, 1}, S_(k+1) = 0.15; token 1: top-2 {4, 3}, S_(k+1) = 0.10. Expert 0 resident.
  pred = rows([0.40, 0.20, 0.15, 0.15, 0.10], [0.10, 0.05, 0.05, 0.30, 0.50])
  resident = mask(5, [0])
  # alpha = 0: every selected expert is top-score (S >= S_(k+1)); non-resident {1, 3, 4}; the
  # first by id.
  targets = prefetch.limited_targets(pred, resident, k=2, alpha=0.0, max_experts=1)
  assert flat(targets) == [1]
  assert flat(prefetch.limited_targets(pred, resident, k=2, alpha=0.0, max_experts=2)) == [1, 3]
  assert flat(prefetch.limited_targets(pred, resident, k=2, alpha=0.0, max_experts=0)) == []
  # alpha = 0.5: S >= 0.225 (token 0) / 0.15 (token 1) -> {0, 3, 4}; by id 3 (0.30), not the
  # higher-scoring 4 (0.50).
  assert flat(prefetch.limited_targets(pred, resident, k=2, alpha=0.5, max_experts=1)) == [3]
  # Padding tokens predict nothing: token 0 alone predicts only the resident 0.
  valid = jnp.array([True, False])
  assert flat(prefetch.limited_targets(pred, resident, k=2, alpha=0.5, max_experts=1, valid=valid)) == []


def test_limited_targets_closed_threshold():
  # Dyadic: selected [0, 1], S_(k+1) = 0.125, alpha = 1 -> bound 0.25; expert 1 (0.25) counts.
  pred = rows([0.5, 0.25, 0.125, 0.0625])
  assert flat(prefetch.limited_targets(pred, mask(4, [0]), k=2, alpha=1.0, max_experts=1)) == [1]
  assert flat(prefetch.prefetch_targets(pred, mask(4, [0]), k=2, alpha=1.0)) == []
  with pytest.raises(ValueError, match="max_experts"):
    prefetch.limited_targets(pred, mask(4, [0]), k=2, alpha=1.0, max_experts=-1)
