"""Choosing alpha under a latency budget (SPEC section 7).

Fit a low-degree polynomial T(alpha) to measured (alpha, TPOT) points and
return the smallest alpha in the measured range whose predicted TPOT meets
the budget: the least substitution, hence the least accuracy loss, that is
fast enough. The fit never extrapolates beyond the measured alphas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class AlphaChoice:
  """alpha: the chosen alpha, or None when no measured alpha meets the budget;
  predicted_tpot_s: T(alpha) (at the fastest alpha when none meets it);
  coefficients: T's coefficients, lowest degree first; degree: of the fit."""

  alpha: float | None
  predicted_tpot_s: float
  coefficients: tuple[float, ...]
  degree: int


def fit_tpot(alphas: Sequence[float], tpots: Sequence[float], degree: int = 2) -> np.polynomial.Polynomial:
  """Least-squares polynomial T(alpha) of `degree` (lowered to points - 1 when there are few points)."""
  alphas, tpots = np.asarray(alphas, float), np.asarray(tpots, float)
  if alphas.shape != tpots.shape or alphas.ndim != 1 or len(alphas) < 2:
    raise ValueError(f"need matching 1-D alphas and TPOTs with >= 2 points, got {alphas.shape} and {tpots.shape}.")
  if degree < 1:
    raise ValueError(f"degree must be >= 1, got {degree}.")
  return np.polynomial.Polynomial.fit(alphas, tpots, min(degree, len(np.unique(alphas)) - 1)).convert()


def choose_alpha(alphas: Sequence[float], tpots: Sequence[float], budget_s: float, *, degree: int = 2) -> AlphaChoice:
  """Smallest alpha in [min(alphas), max(alphas)] with fitted T(alpha) <= budget_s.

  Args:
    alphas, tpots: measured points `[P]` (seconds per token).
    budget_s: the TPOT budget R.
    degree: polynomial degree (low: 1 to 3).

  Returns:
    An `AlphaChoice`; its alpha is None when T stays above the budget on the whole range.
  """
  poly = fit_tpot(alphas, tpots, degree)
  lo, hi = float(np.min(alphas)), float(np.max(alphas))
  coefficients = tuple(float(c) for c in poly.coef)
  if poly(lo) <= budget_s:
    return AlphaChoice(lo, float(poly(lo)), coefficients, poly.degree())
  # T(lo) > R and T is continuous: the first crossing is the smallest real root of T - R in (lo, hi].
  roots = (poly - budget_s).roots()
  roots = sorted(float(r.real) for r in roots if abs(r.imag) < 1e-9 and lo < r.real <= hi)
  if roots:
    return AlphaChoice(roots[0], float(budget_s), coefficients, poly.degree())
  grid = np.linspace(lo, hi, 1001)
  return AlphaChoice(None, float(np.min(poly(grid))), coefficients, poly.degree())
