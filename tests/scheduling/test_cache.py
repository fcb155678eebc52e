"""Tests of moejax.scheduling.cache: state, statistics, admission/eviction."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.scheduling import cache

admit = jax.jit(cache.admit, static_argnames=("policy", "max_loads"))
observe = jax.jit(cache.observe)


def mask(num_experts, ids):
  return jnp.zeros(num_experts, bool).at[jnp.array(ids, jnp.int32)].set(True)


def test_init_and_resident_mask():
  state = cache.init_cache_state(6, 3, window=4)
  assert state.score_hist.shape == (4, 6)
  np.testing.assert_array_equal(state.slot_expert, [-1, -1, -1])
  assert not cache.resident_mask(state).any()
  state = cache.init_cache_state(6, 3, initial_experts=[4, -1, 1])
  np.testing.assert_array_equal(state.expert_slot, [-1, 2, -1, -1, 0, -1])
  np.testing.assert_array_equal(np.flatnonzero(cache.resident_mask(state)), [1, 4])


@pytest.mark.parametrize("initial", [[4, 4, 1], [6, 0, 1], [0, 1], [-2, 0, 1]])
def test_init_rejects_bad_initial_experts(initial):
  with pytest.raises(ValueError, match="initial_experts"):
    cache.init_cache_state(6, 3, initial_experts=initial)


def test_init_rejects_zero_slots():
  with pytest.raises(ValueError, match="num_slots"):
    cache.init_cache_state(6, 0)


def test_observe_statistics():
  state = cache.init_cache_state(3, 2, window=2)
  # Step 0: two valid tokens, mean scores (0.5, 0.3, 0.2); the padding
  # token's scores are ignored.
  scores = jnp.array([[0.6, 0.2, 0.2], [0.4, 0.4, 0.2], [9.0, 9.0, 9.0]])
  state = observe(state, scores, mask(3, [0]), jnp.array([True, True, False]), ema_decay=0.5)
  np.testing.assert_allclose(cache.window_score(state), [0.5, 0.3, 0.2])
  np.testing.assert_allclose(state.ema_score, [0.25, 0.15, 0.1])  # 0.5 * mean
  np.testing.assert_array_equal(state.last_used, [0, -1, -1])
  np.testing.assert_array_equal(state.use_count, [1, 0, 0])
  # Step 1: scores (0.1, 0.1, 0.8). Window mean ((0.5+0.1)/2, ...).
  state = observe(state, jnp.array([[0.1, 0.1, 0.8]]), mask(3, [0, 2]), ema_decay=0.5)
  np.testing.assert_allclose(cache.window_score(state), [0.3, 0.2, 0.5])
  np.testing.assert_allclose(state.ema_score, [0.175, 0.125, 0.45])
  np.testing.assert_array_equal(state.last_used, [1, -1, 1])
  np.testing.assert_array_equal(state.use_count, [2, 0, 1])
  # Step 2 overwrites step 0 in the window of 2: mean of steps 1 and 2.
  state = observe(state, jnp.array([[0.3, 0.7, 0.0]]), mask(3, [1]), ema_decay=0.5)
  np.testing.assert_allclose(cache.window_score(state), [0.2, 0.4, 0.4])
  assert int(state.step) == 3 and state.hist_len.tolist() == [2]
  # A step without valid tokens changes no score statistic.
  before = state
  state = observe(state, jnp.ones((1, 3)), mask(3, []), jnp.array([False]))
  np.testing.assert_array_equal(state.score_hist, before.score_hist)
  np.testing.assert_array_equal(state.ema_score, before.ema_score)
  assert int(state.step) == 4


def full_cache():
  """Slots hold experts 0..3 of 8; each policy has a different victim.

  expert        0     1     2     3
  window score  0.05  0.4   0.3   0.2   -> "score" evicts 0
  last_used     5     1     6     7     -> "lru" evicts 1
  use_count     9     8     2     5     -> "lfu" evicts 2
  ema_score     0.5   0.4   0.3   0.01  -> "mrs" evicts 3
  """
  state = cache.init_cache_state(8, 4, window=1, initial_experts=[0, 1, 2, 3])
  pad = [0.0] * 4
  return state.replace(
    score_hist=jnp.array([[0.05, 0.4, 0.3, 0.2] + pad]),
    hist_len=jnp.array([1], jnp.int32),
    last_used=jnp.array([5, 1, 6, 7] + [-1] * 4, jnp.int32),
    use_count=jnp.array([9.0, 8, 2, 5] + pad),
    ema_score=jnp.array([0.5, 0.4, 0.3, 0.01] + pad),
    step=jnp.int32(8),
  )


@pytest.mark.parametrize("policy,victim", [("score", 0), ("lru", 1), ("lfu", 2), ("mrs", 3)])
def test_eviction_victim_per_policy(policy, victim):
  state, adm = admit(full_cache(), mask(8, [6]), mask(8, []), policy=policy, max_loads=2)
  assert int(adm.count) == 1
  np.testing.assert_array_equal(adm.experts, [6, -1])
  np.testing.assert_array_equal(adm.slots, [victim, -1])  # expert i in slot i
  assert int(state.expert_slot[victim]) == -1
  assert int(state.expert_slot[6]) == victim
  assert int(state.last_used[6]) == 8  # admission counts as a use for LRU


@pytest.mark.parametrize("policy,next_victim", [("score", 3), ("lru", 0), ("lfu", 3), ("mrs", 2)])
def test_shield_and_wanted_experts_are_never_evicted(policy, next_victim):
  victim = {"score": 0, "lru": 1, "lfu": 2, "mrs": 3}[policy]
  # Shielding the victim moves eviction to the next-lowest key.
  _, adm = admit(full_cache(), mask(8, [6]), mask(8, [victim]), policy=policy, max_loads=1)
  np.testing.assert_array_equal(adm.slots, [next_victim])
  # Wanting the (resident) victim protects it the same way.
  _, adm = admit(full_cache(), mask(8, [6, victim]), mask(8, []), policy=policy, max_loads=1)
  np.testing.assert_array_equal(adm.slots, [next_victim])
  # Everything shielded: nothing can be admitted.
  state, adm = admit(full_cache(), mask(8, [6]), mask(8, [0, 1, 2, 3]), policy=policy, max_loads=1)
  assert int(adm.count) == 0
  np.testing.assert_array_equal(state.slot_expert, [0, 1, 2, 3])


def test_empty_slots_first_in_priority_order_until_full():
  # Slots [5, -1, 2, -1]; want 1, 4, 7 with priority 7 > 1 > 4, expert 2
  # shielded, 5 is the only evictable expert.
  state = cache.init_cache_state(8, 4, initial_experts=[5, -1, 2, -1])
  priority = jnp.zeros(8).at[7].set(3.0).at[1].set(2.0).at[4].set(1.0)
  new, adm = admit(state, mask(8, [1, 4, 7]), mask(8, [2]), priority, policy="lru", max_loads=4)
  # 7 -> empty slot 1, 1 -> empty slot 3, 4 evicts 5 from slot 0.
  np.testing.assert_array_equal(adm.experts, [7, 1, 4, -1])
  np.testing.assert_array_equal(adm.slots, [1, 3, 0, -1])
  np.testing.assert_array_equal(new.slot_expert, [4, 7, 2, 1])
  # max_loads caps the copies; the highest priorities go first.
  _, adm = admit(state, mask(8, [1, 4, 7]), mask(8, [2]), priority, policy="lru", max_loads=2)
  np.testing.assert_array_equal(adm.experts, [7, 1])
  # With 5 shielded too, only the two empty slots can be filled.
  new, adm = admit(state, mask(8, [1, 4, 7]), mask(8, [2, 5]), priority, policy="lru", max_loads=4)
  assert int(adm.count) == 2
  np.testing.assert_array_equal(new.slot_expert, [5, 7, 2, 1])


def test_unknown_policy():
  with pytest.raises(ValueError, match="'score', 'lru', 'lfu', 'mrs', 'fifo'"):
    cache.admit(full_cache(), mask(8, [6]), mask(8, []), policy="oldest", max_loads=1)


# --------------------------------------------------------------------------
# Random sequences of steps against a plain-Python reference of admit.
# --------------------------------------------------------------------------


def reference_admit(state, want, shield, priority, policy, max_loads):
  """Admit rule of the cache module docstring as a Python loop."""
  key = np.asarray(cache.eviction_key(state, policy))
  slots = list(np.asarray(state.slot_expert))
  order = sorted(np.flatnonzero(want & (np.asarray(state.expert_slot) < 0)), key=lambda e: (-priority[e], e))
  admitted = []
  for expert in order[:max_loads]:
    if -1 in slots:
      slot = slots.index(-1)
    else:
      evictable = [s for s, e in enumerate(slots) if not (want[e] or shield[e])]
      if not evictable:
        break
      slot = min(evictable, key=lambda s: (key[slots[s]], slots[s]))
    slots[slot] = expert
    admitted.append((expert, slot))
  return slots, admitted


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**32 - 1), policy=st.sampled_from(cache.EVICTION_POLICIES))
def test_random_steps_match_reference(seed, policy):
  rng = np.random.default_rng(seed)
  num_experts, num_slots, max_loads = 10, 4, 3
  state = cache.init_cache_state(num_experts, num_slots, window=3)
  for _ in range(4):
    scores = rng.dirichlet(np.ones(num_experts), size=2).astype(np.float32)
    want = rng.random(num_experts) < 0.3
    shield = rng.random(num_experts) < 0.3
    # Integer priorities make ties, broken by expert id.
    priority = rng.integers(0, 3, num_experts).astype(np.float32)
    slots, admitted = reference_admit(state, want, shield, priority, policy, max_loads)
    before = np.asarray(cache.resident_mask(state))
    state, adm = admit(
      state, jnp.asarray(want), jnp.asarray(shield), jnp.asarray(priority), policy=policy, max_loads=max_loads
    )
    resident = np.asarray(cache.resident_mask(state))
    np.testing.assert_array_equal(state.slot_expert, slots)
    assert int(adm.count) == len(admitted)
    np.testing.assert_array_equal(adm.experts[: len(admitted)], [e for e, _ in admitted])
    np.testing.assert_array_equal(adm.slots[: len(admitted)], [s for _, s in admitted])
    # Invariants: slots bound residency, tables agree, shielded and
    # wanted residents stay.
    assert resident.sum() <= num_slots
    held = np.asarray(state.slot_expert)
    for s, e in enumerate(held):
      if e >= 0:
        assert int(state.expert_slot[e]) == s
    assert resident.sum() == (held >= 0).sum()
    assert resident[before & (shield | want)].all()
    used = rng.random(num_experts) < 0.3
    state = observe(state, jnp.asarray(scores), jnp.asarray(used))


def test_fifo_evicts_in_load_order_whatever_the_hits():
  # Experts 0..3 loaded in slot order; expert 0 is then used (a hit) and 6 is wanted.
  state = cache.init_cache_state(8, 4, initial_experts=[0, 1, 2, 3])
  state = observe(state, jnp.full((1, 8), 0.125), mask(8, [0]))
  new, adm = admit(state, mask(8, [6]), mask(8, []), policy="fifo", max_loads=1)
  np.testing.assert_array_equal(adm.slots, [0])  # FIFO: the first loaded goes, the hit does not save it
  _, adm = admit(state, mask(8, [6]), mask(8, []), policy="lru", max_loads=1)
  np.testing.assert_array_equal(adm.slots, [1])  # LRU: the hit refreshed expert 0
  # Expert 6 is now the newest: the next admissions evict 1, 2, 3 before it.
  assert int(new.loaded_at[6]) == 4 and int(new.admissions) == 5
  _, adm = admit(new, mask(8, [5, 7]), mask(8, []), policy="fifo", max_loads=2)
  np.testing.assert_array_equal(adm.slots, [1, 2])


def test_shared_pool_evicts_across_layers_and_shields_its_own():
  # Two layers (groups) of 4 experts share 3 slots, holding (layer 0, expert 1), (layer 1, expert 2), (layer 0, 3).
  state = cache.init_cache_state(4, 3, window=2, initial_experts=[1, 4 + 2, 3], num_groups=2)
  np.testing.assert_array_equal(np.flatnonzero(cache.resident_mask(state, 0)), [1, 3])
  np.testing.assert_array_equal(np.flatnonzero(cache.resident_mask(state, 1)), [2])
  np.testing.assert_array_equal(cache.expert_slots(state, 1), [-1, -1, 1, -1])
  # Layer 0 uses expert 1, then layer 1 uses expert 2: the LRU clock orders them, and (0, 3) is the oldest.
  state = observe(state, jnp.full((1, 4), 0.25), mask(4, [1]), group=0)
  state = observe(state, jnp.full((1, 4), 0.25), mask(4, [2]), group=1)
  np.testing.assert_array_equal(state.last_used, [-1, 0, -1, -1, -1, -1, 1, -1])
  assert state.hist_len.tolist() == [1, 1]
  # Layer 1 wants expert 0: the victim is layer 0's expert 3 (never used); layer 1's expert 2 is shielded.
  new, adm = admit(state, mask(4, [0]), mask(4, [2]), policy="lru", max_loads=1, group=1)
  np.testing.assert_array_equal(adm.experts, [0])  # layer-local id
  np.testing.assert_array_equal(adm.slots, [2])
  np.testing.assert_array_equal(new.slot_expert, [1, 6, 4])
  # With layer 0's expert 3 kept (in use by the layer before), the next oldest, (0, 1), goes instead.
  keep = jnp.zeros(8, bool).at[3].set(True)
  _, adm = admit(state, mask(4, [0]), mask(4, [2]), policy="lru", max_loads=1, group=1, keep=keep)
  np.testing.assert_array_equal(adm.slots, [0])
