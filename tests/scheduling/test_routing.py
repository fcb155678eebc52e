"""Tests of moejax.scheduling.routing against hand-worked cases and a
plain-Python reference of SPEC section 3."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.scheduling import prefetch, routing

SETTINGS = hypothesis.settings(max_examples=50, deadline=None)

# Compiled once per shape and argument structure, shared by the tests.
route = jax.jit(routing.route, static_argnames=("k", "substitute_weight"))
buddy_route = jax.jit(routing.buddy_route, static_argnames=("k", "substitute_weight"))


def mask(num_experts, ids):
  return jnp.zeros(num_experts, bool).at[jnp.array(ids, jnp.int32)].set(True)


def rows(*lists):
  return jnp.array(lists, jnp.float32)


# --------------------------------------------------------------------------
# Independent reference: SPEC section 3 as plain Python loops.
# --------------------------------------------------------------------------


def reference_route(scores, resident, k, alpha, selected=None, valid=None, similarity=None, substitute_weight="own"):
  """SPEC section 3, one token at a time, in float32 like the library.

  Returns a dict of numpy arrays with the fields of routing.Plan.
  """
  scores = np.asarray(scores, np.float32)
  resident = np.asarray(resident, bool)
  num_tokens, num_experts = scores.shape
  if selected is None:
    # top-k, ties to the lower expert id
    selected = [sorted(range(num_experts), key=lambda e: (-s[e], e))[:k] for s in scores]
  selected = np.asarray(selected, np.int64)
  valid = np.ones(num_tokens, bool) if valid is None else np.asarray(valid)
  a = np.float32(alpha)

  def runner_up(t):
    rest = [scores[t, e] for e in range(num_experts) if e not in selected[t]]
    return max(rest) if rest else None

  def top_set(t):
    s = runner_up(t)
    return {e for e in selected[t] if s is None or scores[t, e] > (np.float32(1) + a) * s}

  def low_set(t):
    s = runner_up(t)
    return set() if s is None else {e for e in selected[t] if s <= scores[t, e] < (np.float32(1) + a) * s}

  batch_top = set()
  for t in range(num_tokens):
    if valid[t]:
      batch_top |= top_set(t)

  experts = selected.copy()
  top_flags = np.zeros((num_tokens, k), bool)
  for t in range(num_tokens):
    if not valid[t]:
      continue
    s = runner_up(t)
    tops = top_set(t)
    top_flags[t] = [e in tops for e in selected[t]]
    lows = low_set(t)
    to_replace = [
      j for j in range(k) if selected[t, j] in lows and not resident[selected[t, j]] and selected[t, j] not in batch_top
    ]
    to_replace.sort(key=lambda j: (-scores[t, selected[t, j]], j))
    candidates = (
      []
      if s is None
      else [
        c
        for c in range(num_experts)
        if c not in selected[t] and (np.float32(1) - a) * s <= scores[t, c] <= s and (resident[c] or c in batch_top)
      ]
    )
    used = set()
    for j in to_replace:
      e = selected[t, j]
      eligible = [c for c in candidates if c not in used and scores[t, c] < scores[t, e]]
      if not eligible:
        continue  # a miss
      if similarity is None:
        best = min(eligible, key=lambda c: (-scores[t, c], c))
      else:
        best = min(eligible, key=lambda c: (-similarity[e, c], -scores[t, c], c))
      experts[t, j] = best
      used.add(best)

  weight_of = selected if substitute_weight == "replaced" else experts
  needed = np.zeros(num_experts, bool)
  for t in range(num_tokens):
    if valid[t]:
      needed[experts[t]] = True
  return dict(
    experts=experts,
    gate_scores=np.take_along_axis(scores, weight_of, axis=1),
    substituted=experts != selected,
    replaced=selected,
    top_score=top_flags,
    missing=needed & ~resident,
    needed=needed,
  )


# --------------------------------------------------------------------------
# Hand-worked cases.
# --------------------------------------------------------------------------

# One token, E = 6, k = 2, alpha = 0.5.
#   selected = [0, 1]; S_(k+1) = 0.18 (expert 2)
#   top-score: S > 1.5 * 0.18 = 0.27 -> expert 0 (0.30); expert 1 (0.22) low
#   window: 0.5 * 0.18 = 0.09 <= S <= 0.18 -> experts 2, 3, 4 (not 5: 0.05)
TOKEN = rows([0.30, 0.22, 0.18, 0.15, 0.10, 0.05])


def test_alpha_zero_with_ties_substitutes_nothing():
  # selected = [0, 1] (tie at 0.2 goes to the lower id), S_(k+1) = 0.2.
  # Expert 1 (0.2) is not top-score (0.2 > 0.2 is false), experts 2 and 3
  # are resident and in the window [0.2, 0.2], but a substitute must score
  # strictly below the expert it replaces: nothing happens.
  scores = rows([0.4, 0.2, 0.2, 0.2])
  plan = route(scores, mask(4, [2, 3]), k=2, alpha=0.0)
  np.testing.assert_array_equal(plan.experts, [[0, 1]])
  assert not plan.substituted.any()
  np.testing.assert_array_equal(plan.top_score, [[True, False]])
  np.testing.assert_array_equal(np.flatnonzero(plan.missing), [0, 1])


def test_low_score_missing_expert_takes_best_resident_candidate():
  # Resident {3, 4}: expert 1 is low-score and missing; the candidates are 3
  # (0.15) and 4 (0.10); the highest-scoring one, 3, replaces it.
  plan = route(TOKEN, mask(6, [3, 4]), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 3]])
  np.testing.assert_allclose(plan.gate_scores, [[0.30, 0.15]])
  np.testing.assert_array_equal(plan.substituted, [[False, True]])
  np.testing.assert_array_equal(plan.replaced, [[0, 1]])
  np.testing.assert_array_equal(plan.top_score, [[True, False]])
  # Expert 0 is top-score and not resident: it must still be fetched.
  np.testing.assert_array_equal(np.flatnonzero(plan.missing), [0])
  np.testing.assert_array_equal(np.flatnonzero(plan.needed), [0, 3])


def test_replaced_weight_option():
  # Same case; the substitute 3 contributes expert 1's score 0.22.
  plan = route(TOKEN, mask(6, [3, 4]), k=2, alpha=0.5, substitute_weight="replaced")
  np.testing.assert_array_equal(plan.experts, [[0, 3]])
  np.testing.assert_allclose(plan.gate_scores, [[0.30, 0.22]])


def test_resident_low_score_expert_is_kept():
  # Expert 1 is low-score but resident: kept although 3 is a candidate.
  plan = route(TOKEN, mask(6, [1, 3]), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 1]])
  assert not plan.substituted.any()


def test_no_candidate_is_a_miss_and_window_is_respected():
  # Only expert 5 (0.05) is resident: below the window floor 0.09, so
  # expert 1 stays and is missing, like expert 0.
  plan = route(TOKEN, mask(6, [5]), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 1]])
  np.testing.assert_array_equal(np.flatnonzero(plan.missing), [0, 1])
  # With alpha = 0.75 the floor is 0.25 * 0.18 = 0.045 <= 0.05 and the top
  # threshold 1.75 * 0.18 = 0.315 > 0.30: both selected experts are
  # low-score. Expert 0 (processed first, higher score) takes 5; expert 1
  # finds no candidate left.
  plan = route(TOKEN, mask(6, [5]), k=2, alpha=0.75)
  np.testing.assert_array_equal(plan.experts, [[5, 1]])
  np.testing.assert_array_equal(plan.top_score, [[False, False]])


def test_batch_top_score_experts_are_candidates_and_kept():
  # Token 1: selected [3, 4], S_(k+1) = 0.05, both above 1.5 * 0.05 =
  # 0.075: top-score, so experts 3 and 4 are computed anyway.
  # Token 0 (nothing resident): its low-score expert 1 takes the best
  # batch top-score candidate in its window, 3 (0.15).
  scores = jnp.concatenate([TOKEN, rows([0.05, 0.05, 0.05, 0.60, 0.20, 0.05])])
  plan = route(scores, mask(6, []), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 3], [3, 4]])
  np.testing.assert_array_equal(np.flatnonzero(plan.missing), [0, 3, 4])
  # Padding tokens provide no candidates: with token 1 invalid, expert 1
  # is a miss and token 1's experts are not needed.
  plan = route(scores, mask(6, []), k=2, alpha=0.5, valid=jnp.array([True, False]))
  np.testing.assert_array_equal(plan.experts, [[0, 1], [3, 4]])
  np.testing.assert_array_equal(np.flatnonzero(plan.needed), [0, 1])
  np.testing.assert_array_equal(plan.top_score[1], [False, False])
  # A low-score expert that is top-score for another token is kept.
  scores = jnp.concatenate([TOKEN, rows([0.05, 0.60, 0.05, 0.05, 0.20, 0.05])])
  plan = route(scores, mask(6, [3]), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 1], [1, 4]])


def test_similarity_ranks_candidates():
  # Resident {2, 3, 4}: by score expert 1 takes 2 (0.18); with similarity
  # row 1 = (.., 2: 0.1, 3: 0.5, 4: 0.9) it takes 4 (score 0.10).
  sim = jnp.zeros((6, 6)).at[1, 2].set(0.1).at[1, 3].set(0.5).at[1, 4].set(0.9)
  plan = route(TOKEN, mask(6, [2, 3, 4]), k=2, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 2]])
  plan = route(TOKEN, mask(6, [2, 3, 4]), k=2, alpha=0.5, similarity=sim)
  np.testing.assert_array_equal(plan.experts, [[0, 4]])
  np.testing.assert_allclose(plan.gate_scores, [[0.30, 0.10]])


def test_replaced_experts_processed_in_descending_score_order():
  # E = 6, k = 3, alpha = 0.7: selected [0, 1, 2], S_(k+1) = 0.17 (expert
  # 3); top threshold 1.7 * 0.17 = 0.289 -> only expert 0 is top-score;
  # window 0.3 * 0.17 = 0.051 <= S <= 0.17 -> candidates 3, 4, 5.
  scores = rows([0.30, 0.20, 0.19, 0.17, 0.08, 0.06])
  resident = mask(6, [3, 4, 5])
  # By score: expert 1 (0.20) first takes 3, then expert 2 takes 4.
  plan = route(scores, resident, k=3, alpha=0.7)
  np.testing.assert_array_equal(plan.experts, [[0, 3, 4]])
  # Both prefer 5 by similarity; expert 1 goes first and gets it, expert 2
  # gets its second choice 3.
  sim = jnp.zeros((6, 6)).at[1, 5].set(0.9).at[1, 4].set(0.5).at[2, 5].set(0.8).at[2, 3].set(0.6)
  plan = route(scores, resident, k=3, alpha=0.7, similarity=sim)
  np.testing.assert_array_equal(plan.experts, [[0, 5, 3]])


def test_custom_selection_never_swaps_in_a_higher_score():
  # A biased router selected [0, 5]: S_(k+1) = 0.22 (expert 1). All but
  # expert 5 are resident. Expert 5 (0.05) is low-score, but every
  # candidate in the window scores above it (1: 0.22, 2: 0.18, ...), so it
  # stays, at any alpha.
  selected = jnp.array([[0, 5]], jnp.int32)
  for alpha in (0.0, 0.5, 0.9):
    plan = route(TOKEN, mask(6, [0, 1, 2, 3, 4]), k=2, alpha=alpha, selected=selected)
    np.testing.assert_array_equal(plan.experts, [[0, 5]])


# A router that selects an expert scoring below S_(k+1). DeepSeek-V3 style: a selection bias of
# +0.1 on expert 3 lifts it to 0.25 and top-3 of the biased scores is [0, 2, 3] (tie 2/3 to the
# lower id). DeepSeek-V2 group-limited greedy over groups {0,1}, {2,3}, {4,5} keeping the 2 best
# groups by their best expert (0.32, 0.25; not 0.20) selects the same [0, 2, 3].
# S_(k+1) = 0.20 (expert 4); expert 3 (0.15) is neither top- nor low-score at any alpha.
BIASED = rows([0.32, 0.01, 0.25, 0.15, 0.20, 0.12])
BIASED_SELECTED = jnp.array([[0, 2, 3]], jnp.int32)


def test_biased_selection_is_reproduced():
  bias = jnp.zeros(6).at[3].set(0.1)
  np.testing.assert_array_equal(np.sort(jax.lax.top_k(BIASED + bias, 3)[1]), BIASED_SELECTED)


def test_selected_expert_below_runner_up_is_kept():
  # alpha = 0.5: top-score S > 0.30 -> expert 0; low-score 0.20 <= S < 0.30 -> expert 2; window
  # [0.10, 0.20] -> experts 4 and 5 (both resident). Expert 2 (missing) takes the best candidate 4.
  # Expert 3 (0.15, missing) is not low-score: it stays, although 5 (0.12) is a resident
  # candidate below it.
  plan = route(BIASED, mask(6, [4, 5]), k=3, alpha=0.5, selected=BIASED_SELECTED)
  np.testing.assert_array_equal(plan.experts, [[0, 4, 3]])
  np.testing.assert_array_equal(plan.top_score, [[True, False, False]])
  np.testing.assert_array_equal(np.flatnonzero(plan.missing), [0, 3])


def test_buddy_alpha_zero_is_exact_on_biased_selection():
  # The failing case of the issue: scores [.30, .01, .25, .02, .20, .19], selected [0, 2, 3],
  # resident {1, 4}. S_(k+1) = 0.20; expert 3 (0.02) scores below it and must be kept at
  # alpha = 0 (it used to be replaced by its buddy 4).
  scores = rows([0.30, 0.01, 0.25, 0.02, 0.20, 0.19])
  selected = jnp.array([[0, 2, 3]], jnp.int32)
  sim = jnp.zeros((6, 6)).at[0, 1].set(0.9).at[2, 4].set(0.7).at[2, 1].set(0.8).at[3, 4].set(0.9).at[3, 5].set(0.5)
  plan = buddy_route(scores, mask(6, [1, 4]), k=3, similarity=sim, selected=selected, alpha=0.0)
  np.testing.assert_array_equal(plan.experts, [[0, 2, 3]])
  assert not plan.substituted.any()
  # alpha = 0.6: low-score is 0.20 <= S < 0.32, so experts 0 and 2 (missing) take buddies 1 and
  # 4 (0 first, higher score); expert 3 stays although buddy 5 is resident.
  plan = buddy_route(scores, mask(6, [1, 4, 5]), k=3, similarity=sim, selected=selected, alpha=0.6)
  np.testing.assert_array_equal(plan.experts, [[1, 4, 3]])
  # Classic BuddyMoE (alpha None) replaces every missing expert.
  plan = buddy_route(scores, mask(6, [1, 4, 5]), k=3, similarity=sim, selected=selected)
  np.testing.assert_array_equal(plan.experts, [[1, 4, 5]])


def test_top_score_and_prefetch_targets_on_biased_selection():
  # alpha = 0: top-score S > 0.20 -> experts 0 and 2, not the selected expert 3 (0.15).
  top = routing.top_score_mask(BIASED, k=3, alpha=0.0, selected=BIASED_SELECTED)
  np.testing.assert_array_equal(np.flatnonzero(top), [0, 2])
  # Predicted top-score experts that are not resident (0 is): 2 only.
  targets = prefetch.prefetch_targets(BIASED, mask(6, [0]), k=3, alpha=0.0, selected=BIASED_SELECTED)
  np.testing.assert_array_equal(np.flatnonzero(targets), [2])
  # alpha = 0.5: S > 0.30 -> expert 0 alone.
  top = routing.top_score_mask(BIASED, k=3, alpha=0.5, selected=BIASED_SELECTED)
  np.testing.assert_array_equal(np.flatnonzero(top), [0])


def test_score_at_upper_bound_is_neither_top_nor_low():
  # Dyadic scores, exact in float32: selected [0, 1], S_(k+1) = 0.125, alpha = 1: the bound is
  # 0.25. Expert 1 (0.25) is not top-score (S > 0.25 fails) and not low-score (S < 0.25 fails):
  # it stays although resident candidate 2 (0.125) is in the window.
  scores = rows([0.5, 0.25, 0.125, 0.0625])
  plan = route(scores, mask(4, [2]), k=2, alpha=1.0)
  np.testing.assert_array_equal(plan.experts, [[0, 1]])
  np.testing.assert_array_equal(plan.top_score, [[True, False]])
  np.testing.assert_array_equal(np.flatnonzero(routing.top_score_mask(scores, k=2, alpha=1.0)), [0])
  # The released code's closed threshold (S >= 0.25) counts it as top-score.
  np.testing.assert_array_equal(np.flatnonzero(routing.top_score_mask(scores, k=2, alpha=1.0, closed=True)), [0, 1])


def test_every_expert_selected():
  # k = E: no unselected expert, S_(k+1) = -inf, so everything is
  # top-score and nothing can be substituted.
  plan = route(rows([0.5, 0.3, 0.2]), mask(3, []), k=3, alpha=0.5)
  np.testing.assert_array_equal(plan.experts, [[0, 1, 2]])
  assert plan.top_score.all() and not plan.substituted.any()
  assert plan.missing.all()


def test_route_jits_with_traced_alpha():
  # alpha is traced: one compilation serves every threshold.
  plan = route(TOKEN, mask(6, [3, 4]), k=2, alpha=jnp.float32(0.5))
  np.testing.assert_array_equal(plan.experts, [[0, 3]])
  plan = route(TOKEN, mask(6, [3, 4]), k=2, alpha=jnp.float32(0.0))
  np.testing.assert_array_equal(plan.experts, [[0, 1]])


def test_user_errors():
  with pytest.raises(ValueError, match="alpha=0"):
    routing.route(TOKEN, mask(6, []), k=2, alpha=-0.1)
  with pytest.raises(ValueError, match="substitute_weight"):
    routing.route(TOKEN, mask(6, []), k=2, alpha=0.1, substitute_weight="mean")
  with pytest.raises(ValueError, match="k must be"):
    routing.route(TOKEN, mask(6, []), k=7, alpha=0.1)
  with pytest.raises(ValueError, match="selected has shape"):
    routing.route(TOKEN, mask(6, []), k=2, alpha=0.1, selected=jnp.zeros((1, 3), jnp.int32))


def test_top_score_mask():
  # alpha = 0: both selected experts beat S_(k+1) = 0.18.
  np.testing.assert_array_equal(np.flatnonzero(routing.top_score_mask(TOKEN, k=2, alpha=0.0)), [0, 1])
  # alpha = 0.5: only expert 0 beats 0.27.
  np.testing.assert_array_equal(np.flatnonzero(routing.top_score_mask(TOKEN, k=2, alpha=0.5)), [0])


def test_cache_prior_logits():
  # Expert 1 (resident) gains 0.6: 0.5 + 0.6 = 1.1 beats expert 0's 1.0.
  logits = rows([1.0, 0.5, 0.9])
  biased = routing.cache_prior_logits(logits, mask(3, [1]), strength=0.6)
  np.testing.assert_allclose(biased, [[1.0, 1.1, 0.9]])
  assert int(jnp.argmax(biased)) == 1
  np.testing.assert_array_equal(routing.cache_prior_logits(logits, mask(3, [1]), strength=0.0), logits)


def test_buddy_route():
  # Selected [0, 1], both missing. Expert 0 (higher score) first takes its
  # most similar resident expert 4 (0.9); expert 1 takes 2 (0.8).
  scores = rows([0.4, 0.3, 0.15, 0.1, 0.05])
  sim = jnp.array(
    [[1, 0.2, 0.5, 0.1, 0.9], [0.2, 1, 0.8, 0.3, 0.7], [0.5, 0.8, 1, 0, 0], [0.1, 0.3, 0, 1, 0], [0.9, 0.7, 0, 0, 1]],
    jnp.float32,
  )
  plan = buddy_route(scores, mask(5, [2, 4]), k=2, similarity=sim)
  np.testing.assert_array_equal(plan.experts, [[4, 2]])
  np.testing.assert_allclose(plan.gate_scores, [[0.05, 0.15]])
  assert not plan.missing.any()
  assert not plan.top_score.any()
  # Only 4 resident: expert 1's buddy list is exhausted, it stays missing.
  plan = buddy_route(scores, mask(5, [4]), k=2, similarity=sim)
  np.testing.assert_array_equal(plan.experts, [[4, 1]])
  np.testing.assert_array_equal(np.flatnonzero(plan.missing), [1])
  np.testing.assert_array_equal(plan.top_score, [[False, True]])


# --------------------------------------------------------------------------
# Properties on random inputs.
# --------------------------------------------------------------------------

SHAPES = [(1, 8, 2), (4, 12, 3), (3, 6, 5)]  # (T, E, k)
ALPHAS = [0.0, 0.125, 0.3, 0.5, 1.0, 2.0]


@st.composite
def cases(draw, shapes=tuple(SHAPES)):
  """A random routing problem; integer-valued scores make ties common."""
  t, e, k = draw(st.sampled_from(shapes))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if draw(st.booleans()):
    scores = rng.integers(1, 8, (t, e)) / 16.0  # dyadic: exact float32
  else:
    logits = rng.normal(size=(t, e)) * rng.uniform(0.5, 3.0)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  scores = scores.astype(np.float32)
  if draw(st.booleans()):  # a grouped/biased router's own selection
    selected = np.stack([rng.permutation(e)[:k] for _ in range(t)])
  else:
    selected = np.stack([sorted(range(e), key=lambda x: (-s[x], x))[:k] for s in scores])
  resident = rng.random(e) < rng.uniform(0, 1)
  valid = rng.random(t) < 0.8 if draw(st.booleans()) else np.ones(t, bool)
  similarity = rng.integers(0, 4, (e, e)).astype(np.float32) if draw(st.booleans()) else None
  return dict(
    scores=scores,
    resident=resident,
    k=k,
    alpha=draw(st.sampled_from(ALPHAS)),
    selected=selected.astype(np.int32),
    valid=valid,
    similarity=similarity,
  )


def run_jit(case):
  args = {key: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for key, v in case.items()}
  return jax.tree.map(np.asarray, route(**args))


@SETTINGS
@hypothesis.given(cases())
def test_route_matches_reference(case):
  plan = run_jit(case)
  expected = reference_route(**case)
  for field in routing.Plan._fields:
    np.testing.assert_array_equal(getattr(plan, field), expected[field], err_msg=field)


@SETTINGS
@hypothesis.given(cases())
def test_route_invariants(case):
  plan = run_jit(case)
  scores, resident, valid = case["scores"], case["resident"], case["valid"]
  selected = case["selected"]
  # Top-score experts are never replaced.
  assert not (plan.top_score & plan.substituted).any()
  assert (plan.experts[plan.top_score] == selected[plan.top_score]).all()
  batch_top = np.zeros(scores.shape[1], bool)
  batch_top[plan.experts[plan.top_score]] = True
  for t in range(scores.shape[0]):
    # Each token's experts are distinct.
    assert len(set(plan.experts[t])) == case["k"]
    unselected = np.setdiff1d(np.arange(scores.shape[1]), selected[t])
    runner_up = scores[t, unselected].max()
    a = np.float32(case["alpha"])
    for j in np.flatnonzero(plan.substituted[t]):
      c = plan.experts[t, j]
      # Only low-score experts are replaced.
      assert runner_up <= scores[t, selected[t, j]] < (np.float32(1) + np.float32(case["alpha"])) * runner_up
      # Substitutes are unselected, in the window, computed anyway.
      assert valid[t] and c in unselected
      assert (np.float32(1) - a) * runner_up <= scores[t, c] <= runner_up
      assert resident[c] or batch_top[c]
      assert scores[t, c] < scores[t, selected[t, j]]
  # Substituted experts never add to the missing set.
  assert not (plan.missing & ~plan.needed).any()
  assert (plan.missing == (plan.needed & ~resident)).all()


@SETTINGS
@hypothesis.given(cases())
def test_alpha_zero_is_exact_routing(case):
  plan = run_jit(dict(case, alpha=0.0))
  np.testing.assert_array_equal(plan.experts, case["selected"])
  assert not plan.substituted.any()


@hypothesis.settings(max_examples=3, deadline=None)
@hypothesis.given(cases(shapes=SHAPES[1:2]))
def test_route_under_jit_equals_eager(case):
  args = {key: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for key, v in case.items()}
  eager = routing.route(**args)
  jitted = route(**args)
  for a, b in zip(eager, jitted):
    np.testing.assert_array_equal(a, b)


def test_default_selection_is_top_k():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.integers(1, 5, (4, 12)) / 8.0, jnp.float32)
  resident = jnp.asarray(rng.random(12) < 0.5)
  plan = route(scores, resident, k=3, alpha=0.5)
  expected = reference_route(scores, resident, 3, 0.5)
  np.testing.assert_array_equal(plan.experts, expected["experts"])
  np.testing.assert_array_equal(plan.replaced, expected["replaced"])


def reference_buddy(scores, resident, k, similarity):
  """BuddyMoE rule as a Python loop: every missing expert, highest score
  first, takes its most similar unused resident expert."""
  experts = []
  for s in np.asarray(scores):
    sel = sorted(range(len(s)), key=lambda e: (-s[e], e))[:k]
    out, used = list(sel), set(sel)
    for j in sorted(range(k), key=lambda j: (-s[sel[j]], j)):
      e = sel[j]
      if resident[e]:
        continue
      buddies = [c for c in range(len(s)) if resident[c] and c not in used]
      if buddies:
        out[j] = min(buddies, key=lambda c: (-similarity[e, c], -s[c], c))
        used.add(out[j])
    experts.append(out)
  return np.array(experts)


@SETTINGS
@hypothesis.given(st.integers(0, 2**32 - 1))
def test_buddy_route_matches_reference(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(1, 8, (4, 12)).astype(np.float32) / 16
  resident = rng.random(12) < 0.4
  sim = rng.integers(0, 4, (12, 12)).astype(np.float32)
  plan = buddy_route(jnp.asarray(scores), jnp.asarray(resident), k=3, similarity=jnp.asarray(sim))
  np.testing.assert_array_equal(plan.experts, reference_buddy(scores, resident, 3, sim))
