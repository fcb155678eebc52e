"""Tests of moejax.scheduling.prefetch."""

import jax.numpy as jnp
import numpy as np

from moejax.scheduling import prefetch


def test_prefetch_targets():
  # Token 0: top-2 = {0, 1}, S_(k+1) = 0.15. Token 1: top-2 = {3, 4},
  # S_(k+1) = 0.1. Expert 0 is resident.
  pred = jnp.array([[0.40, 0.20, 0.15, 0.15, 0.10], [0.10, 0.05, 0.05, 0.50, 0.30]])
  resident = jnp.array([True, False, False, False, False])
  # alpha = 0: the predicted top-k, minus resident expert 0.
  targets = prefetch.prefetch_targets(pred, resident, k=2, alpha=0.0)
  np.testing.assert_array_equal(np.flatnonzero(targets), [1, 3, 4])
  # alpha = 0.5: top-score needs S > 0.225 (token 0) / 0.15 (token 1):
  # expert 1 (0.20) drops out.
  targets = prefetch.prefetch_targets(pred, resident, k=2, alpha=0.5)
  np.testing.assert_array_equal(np.flatnonzero(targets), [3, 4])
  # Padding tokens predict nothing.
  targets = prefetch.prefetch_targets(pred, resident, k=2, alpha=0.0, valid=jnp.array([True, False]))
  np.testing.assert_array_equal(np.flatnonzero(targets), [1])


def test_prefetch_accuracy():
  prefetched = jnp.array([1, 1, 1, 1, 0, 0], bool)
  top = jnp.array([1, 0, 1, 0, 1, 0], bool)
  selected = jnp.array([1, 1, 1, 0, 1, 1], bool)
  counts = prefetch.prefetch_accuracy(prefetched, top, selected)
  assert [int(c) for c in counts] == [4, 2, 3]


def test_activation_targets():
  # Counts rank 2 (9) > 0 (5) = 4 (5) > 1 (1): the 3 most activated are
  # 2, 0 and 4; 0 is resident.
  counts = jnp.array([5.0, 1.0, 9.0, 0.0, 5.0])
  resident = jnp.array([True, False, False, False, False])
  targets = prefetch.activation_targets(counts, resident, num=3)
  np.testing.assert_array_equal(np.flatnonzero(targets), [2, 4])
  # num = 2: the tie between 0 and 4 goes to 0, which is resident.
  targets = prefetch.activation_targets(counts, resident, num=2)
  np.testing.assert_array_equal(np.flatnonzero(targets), [2])
