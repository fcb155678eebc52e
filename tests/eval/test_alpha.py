"""Choosing alpha: polynomial fit of TPOT(alpha) against hand-computed answers."""

import numpy as np
import pytest

from moejax.eval.alpha import choose_alpha, fit_tpot


def test_linear_fit_and_crossing():
  # T = 10 - 20 alpha (ms): T(0.15) = 7.
  alphas = [0.0, 0.1, 0.2, 0.3]
  tpots = [0.010, 0.008, 0.006, 0.004]
  np.testing.assert_allclose(fit_tpot(alphas, tpots, degree=1).coef, [0.010, -0.020], atol=1e-12)
  choice = choose_alpha(alphas, tpots, 0.007, degree=1)
  assert choice.alpha == pytest.approx(0.15)
  assert choice.predicted_tpot_s == pytest.approx(0.007)


def test_quadratic_smallest_root_in_range():
  # T = 5 - 20 a + 20 a^2 (exact on these points): T = 2 at a = (20 - sqrt(160)) / 40 = 0.18377...
  alphas = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
  tpots = 5 - 20 * alphas + 20 * alphas**2
  choice = choose_alpha(alphas, tpots, 2.0, degree=2)
  assert choice.alpha == pytest.approx((20 - np.sqrt(160)) / 40)
  np.testing.assert_allclose(choice.coefficients, [5, -20, 20], atol=1e-9)


def test_budget_met_at_smallest_alpha_and_never():
  alphas, tpots = [0.0, 0.2, 0.4], [0.03, 0.02, 0.01]
  assert choose_alpha(alphas, tpots, 0.05).alpha == 0.0
  never = choose_alpha(alphas, tpots, 0.005, degree=1)
  assert never.alpha is None and never.predicted_tpot_s == pytest.approx(0.01)


def test_bad_inputs():
  with pytest.raises(ValueError, match=">= 2 points"):
    fit_tpot([0.1], [0.01])
  with pytest.raises(ValueError, match="degree"):
    fit_tpot([0.0, 0.1], [0.01, 0.02], degree=0)
