"""Expert-cache routing: which experts each token computes (SPEC sections 2-3).

Given the router's gate scores for one MoE layer and one step, and the set of
experts resident on the device, :func:`route` decides per token which experts
to compute. Low-importance selected experts that are missing from the device
are replaced by similar-scoring experts that are resident (or computed anyway
for another token), so fewer expert copies are needed.

Terms for one token (``s`` = ``S_(k+1)``, the best score among the token's
*unselected* experts; scores are gate probabilities, so non-negative):

- *top-score*: a selected expert with ``S > (1 + alpha) * s``; always computed.
- *low-score*: a selected expert with ``s <= S < (1 + alpha) * s``.
- *candidate*: an unselected expert with ``(1 - alpha) * s <= S <= s`` that is
  resident, or top-score for some valid token of the batch.

A selected expert that is neither (one scoring below ``s``, which grouped or
biased routers select, or one exactly at ``(1 + alpha) * s``) is kept as
routed but, unlike a top-score expert, is not a candidate for other tokens.

Rules of :func:`route`, per valid token:

1. Top-score experts are kept.
2. Low-score experts that are resident or batch top-score are kept.
3. The other low-score experts, taken in descending score order, are each
   replaced by the best remaining candidate: the highest-scoring one, or with a
   ``similarity`` matrix the one most similar to the expert being replaced. A
   candidate is used at most once per token. A substitute always scores
   strictly below the expert it replaces.
4. A low-score expert left without a candidate stays: a miss.

With ``alpha = 0`` no expert is low-score, so the routing is computed exactly
whatever the router selected. The strictness in rule 3 keeps a low-score
expert tied with ``s`` from being swapped for an equal-scoring candidate.

Ties are broken deterministically: candidates of equal score go to the lower
expert id; candidates of equal similarity to the higher score, then the lower
id; low-score experts of equal score are processed in ``selected`` order.

:func:`release_route` is the substitution rule of the paper's released code
(``docs/smoe_release.md``); :func:`buddy_route` (BuddyMoE style) and
:func:`cache_prior_logits` (Mixture of Cache-Conditional Experts style) are
the baselines' routing rules.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

SUBSTITUTE_WEIGHTS = ("own", "replaced")


class Plan(NamedTuple):
  """What one MoE layer computes for a batch of ``T`` tokens.

  Attributes:
    experts: ``[T, k] int32`` expert ids to compute per token, after
      substitution.
    gate_scores: ``[T, k] float32`` score each computed expert contributes
      with, *before* the model's own top-k normalisation (the caller
      normalises).
    substituted: ``[T, k] bool`` the position holds a substitute.
    replaced: ``[T, k] int32`` the originally selected expert of the
      position (equal to ``experts`` where not substituted).
    top_score: ``[T, k] bool`` the position holds a top-score expert.
    missing: ``[E] bool`` experts computed for some valid token that are not
      resident: they must be loaded or computed on the CPU.
    needed: ``[E] bool`` every expert computed for some valid token.

  Rows of invalid (padding) tokens hold their selection unchanged, with
  ``substituted`` and ``top_score`` False; they count towards neither
  ``missing`` nor ``needed``.
  """

  experts: jax.Array
  gate_scores: jax.Array
  substituted: jax.Array
  replaced: jax.Array
  top_score: jax.Array
  missing: jax.Array
  needed: jax.Array


def _as_alpha(alpha) -> jax.Array:
  """Checks a Python ``alpha`` and returns it as a float32 array.

  Thresholds are computed in float32 whether ``alpha`` is a Python number
  or traced, so ``route`` gives the same plan with and without ``jit``.
  """
  if isinstance(alpha, numbers.Real) and not alpha >= 0:
    raise ValueError(
      f"alpha must be >= 0 (got {alpha}); pass alpha=0 to compute the "
      "model's routing exactly, or a positive threshold such as 0.3 to "
      "allow substitution."
    )
  return jnp.asarray(alpha, jnp.float32)


def _default_selection(scores: jax.Array, k: int, selected: jax.Array | None) -> jax.Array:
  """Returns ``selected`` ``[T, k] int32``, by default top-k of ``scores``."""
  num_experts = scores.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"k must be in [1, num_experts={num_experts}] (got {k}); pass the model's experts-per-token.")
  if selected is None:
    return jax.lax.top_k(scores, k)[1].astype(jnp.int32)
  if selected.shape != (scores.shape[0], k):
    raise ValueError(
      f"selected has shape {selected.shape}, expected (T, k) = "
      f"{(scores.shape[0], k)}; pass one row of k expert ids per token."
    )
  return selected.astype(jnp.int32)


def _valid_mask(scores: jax.Array, valid: jax.Array | None) -> jax.Array:
  if valid is None:
    return jnp.ones(scores.shape[:1], bool)
  return valid.astype(bool)


def _selection_mask(selected: jax.Array, num_experts: int) -> jax.Array:
  """``[T, k]`` expert ids -> ``[T, E]`` membership mask."""
  rows = jnp.arange(selected.shape[0])[:, None]
  return jnp.zeros((selected.shape[0], num_experts), bool).at[rows, selected].set(True)


def _score_classes(scores: jax.Array, selected: jax.Array, alpha, *, closed: bool = False):
  """Classifies each token's experts.

  Args:
    scores: ``[T, E]`` float32 gate probabilities.
    selected: ``[T, k] int32`` selection.
    alpha: float32 threshold.
    closed: top-score at ``S >= (1 + alpha) * S_(k+1)`` (the released
      code's threshold) instead of ``S >``.

  Returns:
    ``(selection, runner_up, top, low)``: ``[T, E] bool`` selected experts,
    ``[T, 1]`` ``S_(k+1)`` (the best unselected score, -inf if none),
    ``[T, E] bool`` top-score experts and ``[T, E] bool`` low-score experts
    (selected, ``S_(k+1) <= S < (1 + alpha) * S_(k+1)``).
  """
  selection = _selection_mask(selected, scores.shape[-1])
  runner_up = jnp.max(jnp.where(selection, -jnp.inf, scores), axis=-1, keepdims=True)
  bound = (1 + alpha) * runner_up
  top = selection & ((scores >= bound) if closed else (scores > bound))
  low = selection & (scores >= runner_up) & (scores < bound)
  return selection, runner_up, top, low


def top_score_mask(
  scores: jax.Array,
  *,
  k: int,
  alpha,
  selected: jax.Array | None = None,
  valid: jax.Array | None = None,
  closed: bool = False,
) -> jax.Array:
  """Top-score experts of each token (SPEC section 2).

  Args:
    scores: ``[T, E]`` gate probabilities.
    k: experts per token (static).
    alpha: substitution threshold ``>= 0`` (may be traced).
    selected: ``[T, k] int32`` the model's selection; default top-k.
    valid: ``[T] bool``; rows of invalid tokens are all False.
    closed: use the released code's threshold ``S >= (1 + alpha) * S_(k+1)``
      (static; see :func:`release_route`).

  Returns:
    ``[T, E] bool``: selected with ``S > (1 + alpha) * S_(k+1)``. With
    ``alpha = 0`` that is the selected experts strictly above the best
    unselected one (all of plain top-k, barring ties); a selected expert
    scoring below ``S_(k+1)`` (grouped or biased routers) is never top-score.
  """
  alpha = _as_alpha(alpha)
  scores = scores.astype(jnp.float32)
  selected = _default_selection(scores, k, selected)
  _, _, top, _ = _score_classes(scores, selected, alpha, closed=closed)
  return top & _valid_mask(scores, valid)[:, None]


def _substitute_token(scores, selected, to_replace, eligible, ranking):
  """Greedy one-for-one substitution for one token.

  Args:
    scores: ``[E]`` the token's scores.
    selected: ``[k] int32`` the token's selection.
    to_replace: ``[k] bool`` positions to substitute if possible.
    eligible: ``[k, E] bool`` candidates allowed for each position.
    ranking: ``[k, E] int32`` per position, expert ids best candidate first.

  Returns:
    ``[k] int32`` experts after substitution. Positions are processed in
    descending score order; each takes its best eligible candidate not used
    yet by the token (selected experts count as used).
  """
  num_experts = scores.shape[0]
  order = jnp.argsort(-scores[selected], stable=True)
  used = jnp.zeros(num_experts, bool).at[selected].set(True)

  def body(i, carry):
    experts, used = carry
    pos = order[i]
    perm = ranking[pos]
    ok = (eligible[pos] & ~used)[perm]
    choice = perm[jnp.argmax(ok)]
    found = to_replace[pos] & ok.any()
    experts = experts.at[pos].set(jnp.where(found, choice, experts[pos]))
    used = used.at[choice].set(used[choice] | found)
    return experts, used

  experts, _ = jax.lax.fori_loop(0, selected.shape[0], body, (selected, used))
  return experts


def _candidate_ranking(scores: jax.Array, selected: jax.Array, similarity: jax.Array | None) -> jax.Array:
  """Per position, expert ids best candidate first, ``[T, k, E] int32``.

  By score: descending score, then ascending id. By similarity: descending
  similarity to the position's selected expert, then descending score, then
  ascending id.
  """
  shape = (*selected.shape, scores.shape[-1])
  ids = jnp.broadcast_to(jnp.arange(shape[-1]), shape)
  if similarity is None:
    ranking = jnp.lexsort((ids[:, 0], -scores), axis=-1)[:, None, :]
    return jnp.broadcast_to(ranking, shape).astype(jnp.int32)
  by_score = jnp.broadcast_to(-scores[:, None, :], shape)
  keys = (ids, by_score, -similarity[selected])
  return jnp.lexsort(keys, axis=-1).astype(jnp.int32)


def _check_substitute_weight(substitute_weight: str) -> None:
  if substitute_weight not in SUBSTITUTE_WEIGHTS:
    raise ValueError(f"substitute_weight must be one of {SUBSTITUTE_WEIGHTS} (got {substitute_weight!r}).")


def _make_plan(scores, selected, experts, top, valid, resident, substitute_weight) -> Plan:
  """Assembles the :class:`Plan` from the per-token experts ``[T, k]``."""
  substituted = experts != selected
  weight_of = selected if substitute_weight == "replaced" else experts
  gate_scores = jnp.take_along_axis(scores, weight_of, axis=-1)
  needed = jnp.any(_selection_mask(experts, scores.shape[-1]) & valid[:, None], axis=0)
  return Plan(
    experts=experts,
    gate_scores=gate_scores,
    substituted=substituted,
    replaced=selected,
    top_score=top & valid[:, None],
    missing=needed & ~resident,
    needed=needed,
  )


def _substitute(scores, selected, resident, valid, classes, in_window, ranking, substitute_weight) -> Plan:
  """Rules 1-4 of the module docstring, shared by :func:`route` and :func:`release_route`.

  Args:
    scores: ``[T, E]`` float32; selected: ``[T, k] int32``; resident:
      ``[E] bool``; valid: ``[T] bool``.
    classes: ``(selection, top, low)``, ``[T, E] bool`` each, from
      :func:`_score_classes`.
    in_window: ``[T, E] bool`` scores inside the substitution window.
    ranking: ``[T, k, E] int32`` per position, expert ids best candidate first.
    substitute_weight: as in :func:`route`.
  """
  selection, top_mask, low_mask = classes
  batch_top = jnp.any(top_mask & valid[:, None], axis=0)
  available = resident | batch_top

  top = jnp.take_along_axis(top_mask, selected, axis=-1)
  low = jnp.take_along_axis(low_mask, selected, axis=-1)
  to_replace = low & ~available[selected] & valid[:, None]
  candidates = ~selection & in_window & available
  selected_scores = jnp.take_along_axis(scores, selected, axis=-1)
  eligible = candidates[:, None, :] & (scores[:, None, :] < selected_scores[..., None])
  experts = jax.vmap(_substitute_token)(scores, selected, to_replace, eligible, ranking)
  return _make_plan(scores, selected, experts, top, valid, resident, substitute_weight)


def route(
  scores: jax.Array,
  resident: jax.Array,
  *,
  k: int,
  alpha,
  selected: jax.Array | None = None,
  valid: jax.Array | None = None,
  similarity: jax.Array | None = None,
  substitute_weight: str = "own",
) -> Plan:
  """The expert-cache router (SPEC section 3); rules in the module docstring.

  Args:
    scores: ``[T, E]`` gate probabilities (softmax over all routed experts,
      before top-k renormalisation).
    resident: ``[E] bool`` experts resident on the device.
    k: experts per token (static).
    alpha: substitution threshold ``>= 0``; may be traced. ``0`` computes
      ``selected`` exactly.
    selected: ``[T, k] int32`` the model's own selection (grouped or biased
      routers); default top-k of ``scores``.
    valid: ``[T] bool``, False for padding tokens; default all valid.
    similarity: optional ``[E, E]``; ``similarity[e, c]`` ranks candidate
      ``c`` as a substitute for ``e`` (higher is better) instead of score.
    substitute_weight: ``"own"`` (a substitute contributes its own score) or
      ``"replaced"`` (the score of the expert it replaces).

  Returns:
    A :class:`Plan`.
  """
  alpha = _as_alpha(alpha)
  _check_substitute_weight(substitute_weight)
  scores = scores.astype(jnp.float32)
  selected = _default_selection(scores, k, selected)
  valid = _valid_mask(scores, valid)
  resident = resident.astype(bool)

  selection, runner_up, top, low = _score_classes(scores, selected, alpha)
  in_window = (scores >= (1 - alpha) * runner_up) & (scores <= runner_up) & jnp.isfinite(runner_up)
  ranking = _candidate_ranking(scores, selected, similarity)
  return _substitute(scores, selected, resident, valid, (selection, top, low), in_window, ranking, substitute_weight)


def release_route(
  scores: jax.Array,
  resident: jax.Array,
  *,
  k: int,
  alpha,
  selected: jax.Array | None = None,
  valid: jax.Array | None = None,
  substitute_weight: str = "own",
) -> Plan:
  """The substitution rule of the paper's released code (``docs/smoe_release.md``).

  The rules of :func:`route` with three differences, per token
  (``s = S_(k+1)``):

  - top-score is ``S >= (1 + alpha) * s`` (closed), so low-score is
    ``s <= S < (1 + alpha) * s``;
  - the candidate window is open at both ends, ``(1 - alpha) * s < S < s``:
    the runner-up (and any expert tied with it) is never a substitute, and
    with ``alpha = 0`` there is no candidate at all;
  - a missing low-score expert takes the first eligible candidate in
    ascending expert id, whatever its score (the release takes the first in
    Python set iteration order, which is not defined by the scores; ascending
    id makes it deterministic).

  As in :func:`route`, candidates are resident or top-score for some valid
  token of the batch (the release's ``replaceset``), each is used at most
  once per token, low-score experts are processed in descending score order,
  and low-score experts that are resident or batch top-score are kept. The
  release routes plain top-k only; for a ``selected`` from a grouped or biased
  router a selected expert below ``s`` is kept, as in :func:`route`.

  Args:
    scores: ``[T, E]`` gate probabilities (softmax over all routed experts).
    resident: ``[E] bool`` experts resident on the device.
    k: experts per token (static).
    alpha: substitution threshold ``>= 0`` (the release ships 0.25); may be
      traced. ``0`` computes ``selected`` exactly.
    selected: ``[T, k] int32``; default top-k of ``scores``.
    valid: ``[T] bool``, False for padding tokens (the release routes padding
      like any token; moejax leaves it out).
    substitute_weight: as in :func:`route`; the release uses ``"own"`` and
      then renormalises over the final k (for DeepSeek-MoE and XVERSE always,
      for Qwen2-MoE by ``norm_topk_prob``), which is the caller's part.

  Returns:
    A :class:`Plan`; ``top_score`` marks ``S >= (1 + alpha) * s``.
  """
  alpha = _as_alpha(alpha)
  _check_substitute_weight(substitute_weight)
  scores = scores.astype(jnp.float32)
  selected = _default_selection(scores, k, selected)
  valid = _valid_mask(scores, valid)
  resident = resident.astype(bool)

  selection, runner_up, top, low = _score_classes(scores, selected, alpha, closed=True)
  in_window = (scores > (1 - alpha) * runner_up) & (scores < runner_up) & jnp.isfinite(runner_up)
  ranking = jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.int32), (*selected.shape, scores.shape[-1]))
  return _substitute(scores, selected, resident, valid, (selection, top, low), in_window, ranking, substitute_weight)


def buddy_route(
  scores: jax.Array,
  resident: jax.Array,
  *,
  k: int,
  similarity: jax.Array,
  selected: jax.Array | None = None,
  valid: jax.Array | None = None,
  substitute_weight: str = "own",
  alpha=None,
) -> Plan:
  """BuddyMoE-style routing: replace every missing expert by its best buddy.

  Per valid token, each selected expert that is not resident is replaced
  (in descending score order) by the resident expert most similar to it
  that the token does not already use, whatever its score; without such an
  expert it stays missing. With ``alpha`` given, only low-score experts
  (``S_(k+1) <= S < (1 + alpha) * S_(k+1)``) may be replaced, so that
  ``alpha = 0`` computes the selection exactly, as for every moejax policy:
  top-score experts, and selected experts scoring below ``S_(k+1)`` (grouped
  or biased routers), are kept.

  Args:
    scores: ``[T, E]`` gate probabilities.
    resident: ``[E] bool`` experts resident on the device.
    k: experts per token (static).
    similarity: ``[E, E]``; ``similarity[e, c]`` ranks ``c`` as a buddy of
      ``e`` (e.g. :func:`moejax.scheduling.similarity.coactivation`).
    selected: ``[T, k] int32``; default top-k of ``scores``.
    valid: ``[T] bool``, False for padding tokens.
    substitute_weight: as in :func:`route`.
    alpha: optional threshold restricting replacement to low-score experts
      (None: classic BuddyMoE, any missing expert may be replaced); may be
      traced.

  Returns:
    A :class:`Plan`; ``top_score`` marks the unsubstituted positions whose
    expert scores strictly above ``(1 + alpha) * S_(k+1)`` (``alpha = 0``
    when None).
  """
  _check_substitute_weight(substitute_weight)
  scores = scores.astype(jnp.float32)
  selected = _default_selection(scores, k, selected)
  valid = _valid_mask(scores, valid)
  num_experts = scores.shape[-1]
  resident = resident.astype(bool)

  _, _, top_mask, low_mask = _score_classes(scores, selected, 0.0 if alpha is None else _as_alpha(alpha))
  top = jnp.take_along_axis(top_mask, selected, axis=-1)
  to_replace = ~resident[selected] & valid[:, None]
  if alpha is not None:
    to_replace = to_replace & jnp.take_along_axis(low_mask, selected, axis=-1)
  eligible = jnp.broadcast_to(resident, (*selected.shape, num_experts))
  ranking = _candidate_ranking(scores, selected, similarity)
  experts = jax.vmap(_substitute_token)(scores, selected, to_replace, eligible, ranking)
  return _make_plan(scores, selected, experts, top & (experts == selected), valid, resident, substitute_weight)


def cache_prior_logits(logits: jax.Array, resident: jax.Array, *, strength) -> jax.Array:
  """Biases router logits toward resident experts before top-k.

  Mixture of Cache-Conditional Experts (Skliar et al., 2024, arXiv
  2412.00099) makes routing cache-aware by adding a constant to the logits
  of experts already in the cache, so that among experts of similar
  importance the cached ones win top-k. The caller takes top-k of the
  biased logits to select experts and, as in that paper, keeps computing
  the gate weights of the selected experts from the unbiased logits.

  Args:
    logits: ``[T, E]`` router logits (before softmax).
    resident: ``[E] bool`` experts resident on the device.
    strength: bias added to resident experts, in logit units (``0`` leaves
      routing unchanged; may be traced).

  Returns:
    ``[T, E]`` biased logits, same dtype as ``logits``.
  """
  bias = jnp.where(resident.astype(bool), strength, 0).astype(logits.dtype)
  return logits + bias
