"""Per-layer expert-cache state, its statistics and admission/eviction.

The device holds ``S`` expert slots per MoE layer. :class:`CacheState` is the
layer's bookkeeping as a pytree: which expert sits in which slot, plus the
statistics that the eviction policies rank experts by. The state never holds
weights; the offload layer copies the experts that :func:`admit` lists.

Per step the caller (the engine) does, for each layer::

    plan = route(scores, resident_mask(state), ...)
    state, adm = admit(state, want, shield, priority, policy=..., max_loads=...)
    ... copy adm.experts into adm.slots, compute ...
    state = observe(state, scores, plan.needed, valid)

Eviction policies (the resident, non-shielded expert with the lowest key is
evicted; ties go to the lowest expert id):

- ``"score"``: mean gate score over the last ``n`` steps (SPEC section 4).
- ``"lru"``: step of last use (mixtral-offloading style).
- ``"lfu"``: accumulated activation count (MoE-Infinity style).
- ``"mrs"``: exponentially decayed gate score (HybriMoE's score-based MRS).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

EVICTION_POLICIES = ("score", "lru", "lfu", "mrs")


@flax.struct.dataclass
class CacheState:
  """Bookkeeping of one layer's expert cache (``S`` slots, ``E`` experts).

  Attributes:
    slot_expert: ``[S] int32`` expert held by each slot, -1 if empty.
    expert_slot: ``[E] int32`` slot of each expert, -1 if not resident.
    score_hist: ``[n, E] float32`` ring buffer of the last ``n`` steps' mean
      gate score per expert.
    hist_len: ``int32`` number of valid rows in ``score_hist``.
    hist_pos: ``int32`` row the next step writes.
    last_used: ``[E] int32`` step at which each expert was last used or
      admitted (-1: never); the LRU clock.
    use_count: ``[E] float32`` steps in which each expert was used (LFU).
    ema_score: ``[E] float32`` exponentially decayed mean gate score (MRS).
    step: ``int32`` steps observed so far.
  """

  slot_expert: jax.Array
  expert_slot: jax.Array
  score_hist: jax.Array
  hist_len: jax.Array
  hist_pos: jax.Array
  last_used: jax.Array
  use_count: jax.Array
  ema_score: jax.Array
  step: jax.Array

  @property
  def num_slots(self) -> int:
    return self.slot_expert.shape[-1]

  @property
  def num_experts(self) -> int:
    return self.expert_slot.shape[-1]


class Admission(NamedTuple):
  """Experts to copy to the device, as listed by :func:`admit`.

  Attributes:
    experts: ``[max_loads] int32`` admitted expert ids, in admission order,
      padded with -1.
    slots: ``[max_loads] int32`` slot each admitted expert goes to, padded
      with -1. The expert previously in that slot (if any) is evicted.
    count: ``int32`` number of admitted experts.
  """

  experts: jax.Array
  slots: jax.Array
  count: jax.Array


def _expert_slot_table(slot_expert: jax.Array, num_experts: int) -> jax.Array:
  """``[S]`` slot -> expert table to the ``[E]`` expert -> slot table."""
  slots = jnp.arange(slot_expert.shape[0], dtype=jnp.int32)
  index = jnp.where(slot_expert >= 0, slot_expert, num_experts)
  return jnp.full(num_experts, -1, jnp.int32).at[index].set(slots, mode="drop")


def init_cache_state(num_experts: int, num_slots: int, *, window: int = 8, initial_experts=None) -> CacheState:
  """An empty (or pre-filled) cache for one layer.

  Args:
    num_experts: ``E``, routed experts of the layer.
    num_slots: ``S >= 1``, device expert slots of the layer.
    window: ``n``, steps of score history for the ``"score"`` policy.
    initial_experts: optional ``[S] int32`` expert per slot (-1 empty),
      e.g. the most activated experts of a calibration run.

  Returns:
    A :class:`CacheState` with all statistics zero and ``last_used`` -1.
  """
  if num_slots < 1:
    raise ValueError(
      f"num_slots must be >= 1 (got {num_slots}); use the 'resident' or "
      "'cpu' policy for a layer without an expert cache."
    )
  if window < 1:
    raise ValueError(f"window must be >= 1 (got {window}).")
  if initial_experts is None:
    slot_expert = jnp.full(num_slots, -1, jnp.int32)
  else:
    ids = np.asarray(initial_experts)
    placed = ids[ids >= 0]
    if (
      ids.shape != (num_slots,)
      or np.any(ids >= num_experts)
      or np.any(ids < -1)
      or len(np.unique(placed)) != len(placed)
    ):
      raise ValueError(
        f"initial_experts must be {num_slots} distinct expert ids in "
        f"[0, {num_experts}) or -1 for an empty slot (got {ids})."
      )
    slot_expert = jnp.asarray(ids, jnp.int32)
  return CacheState(
    slot_expert=slot_expert,
    expert_slot=_expert_slot_table(slot_expert, num_experts),
    score_hist=jnp.zeros((window, num_experts), jnp.float32),
    hist_len=jnp.int32(0),
    hist_pos=jnp.int32(0),
    last_used=jnp.full(num_experts, -1, jnp.int32),
    use_count=jnp.zeros(num_experts, jnp.float32),
    ema_score=jnp.zeros(num_experts, jnp.float32),
    step=jnp.int32(0),
  )


def resident_mask(state: CacheState) -> jax.Array:
  """``[E] bool``: experts currently in a slot."""
  return state.expert_slot >= 0


def window_score(state: CacheState) -> jax.Array:
  """``[E] float32``: mean gate score over the history window (0 if empty)."""
  total = jnp.sum(state.score_hist, axis=0)
  return total / jnp.maximum(state.hist_len, 1).astype(jnp.float32)


def observe(
  state: CacheState, scores: jax.Array, used: jax.Array, valid: jax.Array | None = None, *, ema_decay: float = 0.9
) -> CacheState:
  """Records one step of the layer in the cache statistics.

  Args:
    state: the layer's :class:`CacheState`.
    scores: ``[T, E]`` gate probabilities of all experts this step.
    used: ``[E] bool`` experts computed this step (e.g. ``Plan.needed``).
    valid: ``[T] bool``, False for padding tokens; default all valid.
    ema_decay: weight of the past in ``ema_score`` (may be traced).

  Returns:
    The state with this step's mean score over valid tokens pushed into the
    window and blended into ``ema_score``, ``last_used`` and ``use_count``
    updated for ``used``, and ``step`` advanced. A step without valid
    tokens leaves the score statistics unchanged.
  """
  if valid is None:
    valid = jnp.ones(scores.shape[:1], bool)
  valid = valid.astype(bool)
  n_valid = jnp.sum(valid)
  mean = (jnp.sum(jnp.where(valid[:, None], scores, 0), axis=0) / jnp.maximum(n_valid, 1)).astype(jnp.float32)
  has_tokens = n_valid > 0
  window = state.score_hist.shape[0]

  score_hist = state.score_hist.at[state.hist_pos].set(jnp.where(has_tokens, mean, state.score_hist[state.hist_pos]))
  ema = ema_decay * state.ema_score + (1 - ema_decay) * mean
  used = used.astype(bool)
  return state.replace(
    score_hist=score_hist,
    hist_len=jnp.where(has_tokens, jnp.minimum(state.hist_len + 1, window), state.hist_len),
    hist_pos=jnp.where(has_tokens, (state.hist_pos + 1) % window, state.hist_pos),
    last_used=jnp.where(used, state.step, state.last_used),
    use_count=state.use_count + used,
    ema_score=jnp.where(has_tokens, ema, state.ema_score).astype(jnp.float32),
    step=state.step + 1,
  )


def eviction_key(state: CacheState, policy: str) -> jax.Array:
  """``[E] float32`` key of each expert; the lowest is evicted first."""
  if policy == "score":
    return window_score(state)
  if policy == "lru":
    return state.last_used.astype(jnp.float32)
  if policy == "lfu":
    return state.use_count
  if policy == "mrs":
    return state.ema_score
  raise ValueError(f"unknown eviction policy {policy!r}; choose one of {EVICTION_POLICIES}.")


def admit(
  state: CacheState,
  want: jax.Array,
  shield: jax.Array,
  priority: jax.Array | None = None,
  *,
  policy: str,
  max_loads: int,
) -> tuple[CacheState, Admission]:
  """Admits wanted experts into the cache, evicting by ``policy``.

  Wanted experts that are not resident are admitted one at a time, highest
  ``priority`` first (ties: lower expert id), at most ``max_loads`` of them.
  Each goes to an empty slot if there is one (lowest slot first), otherwise
  it evicts the resident expert with the lowest :func:`eviction_key` that is
  neither shielded nor wanted (wanted experts, resident or admitted in this
  call, are never evicted). Admission stops once no slot can be freed.

  Args:
    state: the layer's :class:`CacheState`.
    want: ``[E] bool`` experts to bring to the device.
    shield: ``[E] bool`` experts that must stay (e.g. computed this layer).
    priority: ``[E] float`` admission order, higher first; default expert
      id order.
    policy: one of :data:`EVICTION_POLICIES` (static).
    max_loads: most experts admitted by this call (static).

  Returns:
    ``(state, admission)``: slot tables updated (admitted experts get
    ``last_used = state.step``), and the :class:`Admission` listing the
    copies to make.
  """
  key = eviction_key(state, policy)
  if max_loads < 0:
    raise ValueError(f"max_loads must be >= 0 (got {max_loads}).")
  num_experts = state.num_experts
  want = want.astype(bool)
  to_admit = want & (state.expert_slot < 0)
  protected = want | shield.astype(bool)
  if priority is None:
    priority = jnp.zeros(num_experts, jnp.float32)
  ids = jnp.arange(num_experts)
  order = jnp.lexsort((ids, -priority, ~to_admit))

  def body(i, carry):
    slot_expert, expert_slot, experts, slots, count = carry
    expert = order[i]
    empty = slot_expert < 0
    evictable = ~empty & ~protected[jnp.maximum(slot_expert, 0)]
    slot_key = key[jnp.maximum(slot_expert, 0)]
    # Lowest key first; ties go to the lowest expert id, so the outcome
    # does not depend on which slot an expert happens to occupy.
    lowest = jnp.min(jnp.where(evictable, slot_key, jnp.inf))
    tied = evictable & (slot_key == lowest)
    victim_slot = jnp.argmin(jnp.where(tied, slot_expert, num_experts))
    slot = jnp.where(empty.any(), jnp.argmax(empty), victim_slot)
    ok = to_admit[expert] & (empty.any() | evictable.any())
    # An expert left out means no slot is free: later ones skip as well.
    ok = ok & (count == i)
    victim = slot_expert[slot]
    new_expert_slot = expert_slot.at[jnp.where(victim >= 0, victim, num_experts)].set(-1, mode="drop")
    new_expert_slot = new_expert_slot.at[expert].set(slot)
    return (
      jnp.where(ok, slot_expert.at[slot].set(expert), slot_expert),
      jnp.where(ok, new_expert_slot, expert_slot),
      experts.at[i].set(jnp.where(ok, expert, -1)),
      slots.at[i].set(jnp.where(ok, slot, -1)),
      count + ok,
    )

  padding = jnp.full(max_loads, -1, jnp.int32)
  slot_expert, expert_slot, experts, slots, count = jax.lax.fori_loop(
    0, min(max_loads, num_experts), body, (state.slot_expert, state.expert_slot, padding, padding, jnp.int32(0))
  )
  admitted = jnp.isin(ids, experts)
  state = state.replace(
    slot_expert=slot_expert, expert_slot=expert_slot, last_used=jnp.where(admitted, state.step, state.last_used)
  )
  return state, Admission(experts=experts, slots=slots, count=count)
