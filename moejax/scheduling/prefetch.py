"""Prefetch targets of the next layer and prefetch accuracy (SPEC section 5).

The predictor of layer ``l + 1``'s scores (the paper's provisional output, or
the next gate applied to the current hidden state) needs the model and lives
in the engine; this module turns predicted scores (or, for the MoE-Infinity
style baseline, activation counts) into the experts to start copying, and
counts how good the prediction was. :func:`limited_targets` is the choice of
the paper's released code (``docs/smoe_release.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.scheduling.routing import top_score_mask


def prefetch_targets(
  pred_scores: jax.Array,
  resident: jax.Array,
  *,
  k: int,
  alpha,
  valid: jax.Array | None = None,
  selected: jax.Array | None = None,
) -> jax.Array:
  """Experts to prefetch: predicted top-score experts that are not resident.

  Args:
    pred_scores: ``[T, E]`` predicted gate probabilities of the next layer.
    resident: ``[E] bool`` experts of the next layer on the device.
    k: experts per token (static).
    alpha: substitution threshold ``>= 0``; predicted top-score means
      ``S > (1 + alpha) * S_(k+1)``, with ``alpha = 0`` the predicted top-k.
    valid: ``[T] bool``, False for padding tokens.
    selected: ``[T, k] int32`` predicted selection (grouped or biased
      routers); default top-k of ``pred_scores``.

  Returns:
    ``[E] bool`` experts to start copying.
  """
  top = top_score_mask(pred_scores, k=k, alpha=alpha, selected=selected, valid=valid)
  return jnp.any(top, axis=0) & ~resident.astype(bool)


def limited_targets(
  pred_scores: jax.Array,
  resident: jax.Array,
  *,
  k: int,
  alpha,
  max_experts: int,
  valid: jax.Array | None = None,
  selected: jax.Array | None = None,
) -> jax.Array:
  """The released code's prefetch: at most ``max_experts`` predicted experts.

  The predicted top-score experts of the batch under the release's closed
  threshold ``S >= (1 + alpha) * S_(k+1)``, less the resident ones, taken in
  ascending expert id up to ``max_experts`` (the release ships 1). The
  release takes the first non-resident one in Python set iteration order,
  which the scores do not decide; ascending id makes the choice deterministic
  and, like the release's, blind to the predicted score.

  The release also prefetches only when the current layer had a miss (an
  expert loaded or computed on the CPU), and issues the copy after the
  layer's own loads and CPU work: both are the engine's part, not this
  function's.

  Args:
    pred_scores: ``[T, E]`` predicted gate probabilities of the next layer.
    resident: ``[E] bool`` experts of the next layer on the device.
    k: experts per token (static).
    alpha: substitution threshold ``>= 0`` (may be traced).
    max_experts: most experts to prefetch (static, ``>= 0``).
    valid: ``[T] bool``, False for padding tokens.
    selected: ``[T, k] int32`` predicted selection; default top-k of
      ``pred_scores`` (the release's only rule).

  Returns:
    ``[E] bool`` experts to start copying.
  """
  if max_experts < 0:
    raise ValueError(f"max_experts must be >= 0 (got {max_experts}); the released code prefetches 1 per layer.")
  top = top_score_mask(pred_scores, k=k, alpha=alpha, selected=selected, valid=valid, closed=True)
  wanted = jnp.any(top, axis=0) & ~resident.astype(bool)
  return wanted & (jnp.cumsum(wanted) <= max_experts)


def activation_targets(use_count: jax.Array, resident: jax.Array, *, num: int) -> jax.Array:
  """Experts to prefetch by accumulated activation counts (MoE-Infinity).

  Args:
    use_count: ``[E]`` activation counts of the next layer's experts (e.g.
      ``CacheState.use_count``).
    resident: ``[E] bool`` experts of the next layer on the device.
    num: how many of the most activated experts to hold (static), e.g. the
      layer's slot count.

  Returns:
    ``[E] bool``: the ``num`` most activated experts (ties: lower id) that
    are not resident.
  """
  top = jax.lax.top_k(use_count, num)[1]
  wanted = jnp.zeros(use_count.shape, bool).at[top].set(True)
  return wanted & ~resident.astype(bool)


def prefetch_accuracy(
  prefetched: jax.Array, actual_top_score: jax.Array, actual_selected: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Counters for prefetch accuracy, to be summed over steps and layers.

  Args:
    prefetched: ``[E] bool`` experts prefetched for the layer.
    actual_top_score: ``[E] bool`` experts that turned out top-score for
      some valid token.
    actual_selected: ``[E] bool`` experts that turned out selected at all.

  Returns:
    ``(n_prefetched, n_top, n_selected)`` int32: prefetched experts, and
    those that turned out top-score / selected. The accuracies the paper
    reports (about 82% and 95%) are ``n_top / n_prefetched`` and
    ``n_selected / n_prefetched``.
  """
  prefetched = prefetched.astype(bool)
  top = prefetched & actual_top_score.astype(bool)
  selected = prefetched & actual_selected.astype(bool)
  return tuple(jnp.sum(mask, dtype=jnp.int32) for mask in (prefetched, top, selected))
