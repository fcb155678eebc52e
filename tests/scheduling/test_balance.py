"""Tests of moejax.scheduling.balance: the two-pointer split and costs."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from moejax.scheduling import balance

split = jax.jit(balance.split_load_cpu)
NEG = -np.inf


def reference_split(scores, valid, c_load, c_cpu):
  """SPEC section 6 with explicit pointers, float32 times like the library."""
  present = [i for i in range(len(scores)) if valid[i] and scores[i] != NEG]
  ordered = sorted(present, key=lambda i: (-scores[i], i))
  load, cpu = set(), set()
  lo, hi = 0, len(ordered) - 1
  t_load = t_cpu = np.float32(0)
  while lo <= hi:
    if t_load <= t_cpu:
      load.add(ordered[lo])
      lo += 1
      t_load = t_load + np.float32(c_load)
    else:
      cpu.add(ordered[hi])
      hi -= 1
      t_cpu = t_cpu + np.float32(c_cpu)
  return load, cpu


def flat(mask):
  return set(np.flatnonzero(np.asarray(mask)).tolist())


def test_five_experts_load_twice_as_slow():
  # Scores of experts a..e: 0.5 > 0.4 > 0.3 > 0.2 > 0.1, given unsorted,
  # with absent entries (-inf, and an invalid one).
  # c_load = 2, c_cpu = 1; (t_load, t_cpu) before each step:
  #   (0, 0): 0 <= 0 -> load a (highest)      -> (2, 0)
  #   (2, 0): 2 >  0 -> cpu e (lowest)        -> (2, 1)
  #   (2, 1): 2 >  1 -> cpu d                 -> (2, 2)
  #   (2, 2): 2 <= 2 -> load b                -> (4, 2)
  #   (4, 2): 4 >  2 -> cpu c                 -> (4, 3)
  # load {a, b}, cpu {c, d, e}; the step waits max(4, 3) = 4.
  #          a    d    -    c    e    b    (invalid)
  scores = [0.5, 0.2, NEG, 0.3, 0.1, 0.4, 0.9]
  valid = jnp.array([True] * 6 + [False])
  load, cpu = split(jnp.array(scores), valid, c_load=2.0, c_cpu=1.0)
  assert flat(load) == {0, 5}
  assert flat(cpu) == {1, 3, 4}


def test_equal_costs_alternate():
  # c_load = c_cpu = 1: load, cpu, load, cpu, load -> 3 loads, 2 on CPU.
  load, cpu = split(jnp.array([5.0, 4, 3, 2, 1]), c_load=1.0, c_cpu=1.0)
  assert flat(load) == {0, 1, 2}
  assert flat(cpu) == {3, 4}


def test_nothing_missing():
  load, cpu = split(jnp.full(4, -jnp.inf), c_load=1.0, c_cpu=1.0)
  assert not load.any() and not cpu.any()


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
  seed=st.integers(0, 2**32 - 1),
  c_load=st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0, 1e-3]),
  c_cpu=st.sampled_from([0.25, 0.5, 1.0, 2.0, 7.0, 3e-3]),
)
def test_split_matches_reference(seed, c_load, c_cpu):
  rng = np.random.default_rng(seed)
  size = 12
  scores = rng.integers(0, 5, size).astype(np.float32)  # ties included
  scores[rng.random(size) < 0.3] = NEG
  valid = rng.random(size) < 0.8
  load, cpu = split(jnp.asarray(scores), jnp.asarray(valid), c_load=c_load, c_cpu=c_cpu)
  load, cpu = flat(load), flat(cpu)
  present = {i for i in range(size) if valid[i] and scores[i] != NEG}
  # Every present expert in exactly one of the two, absent ones in neither.
  assert load | cpu == present and not load & cpu
  assert (load, cpu) == reference_split(scores, valid, c_load, c_cpu)
  # The loaded experts score at least as high as the CPU ones.
  if load and cpu:
    assert min(scores[list(load)]) >= max(scores[list(cpu)])


def test_cost_model_running_means():
  cost = balance.init_cost_model(load_s=1.0, cpu_s=2.0)
  update = jax.jit(balance.update_costs)
  # No measurement: the priors stay.
  cost = update(cost, load_s=0.0, n_load=0)
  np.testing.assert_allclose([cost.load_s, cost.cpu_s], [1.0, 2.0])
  # First measurement replaces the prior: 3 loads in 0.6 s -> 0.2 s each.
  cost = update(cost, load_s=0.6, n_load=3)
  np.testing.assert_allclose(cost.load_s, 0.2)
  # Then a running mean over all 4 loads: (0.6 + 1.0) / 4 = 0.4.
  cost = update(cost, load_s=1.0, n_load=1)
  np.testing.assert_allclose(cost.load_s, (0.6 + 1.0) / 4)
  cost = update(cost, cpu_s=0.3, n_cpu=2, load_s=None)
  np.testing.assert_allclose([cost.cpu_s, cost.n_cpu, cost.n_load], [0.15, 2, 4])
