"""Expert-cache state, its statistics and admission/eviction.

The device holds ``S`` expert slots, either per MoE layer or in one pool that
all MoE layers share (the paper's released code). :class:`CacheState` is the
bookkeeping of one such set of slots as a pytree: which expert sits in which
slot, plus the statistics that the eviction policies rank experts by. The
state never holds weights; the offload layer copies the experts that
:func:`admit` lists.

A state serves ``G`` *groups* of ``E`` experts: ``G = 1`` for a per-layer
cache, ``G`` = the number of MoE layers for a shared pool, where the expert
``e`` of the layer in group ``g`` has the key ``g * E + e``. Every function
takes and returns one group's view (``[E]`` masks, layer-local expert ids);
eviction chooses among the residents of *all* groups.

Per step the caller (the engine) does, for each layer (its group ``g``)::

    plan = route(scores, resident_mask(state, g), ...)
    state, adm = admit(state, want, shield, priority, policy=..., max_loads=..., group=g)
    ... copy adm.experts into adm.slots, compute ...
    state = observe(state, scores, plan.needed, valid, group=g)

Eviction policies (the resident, non-shielded expert with the lowest key is
evicted; ties go to the lowest key):

- ``"score"``: mean gate score over the last ``n`` steps of its layer (SPEC section 4).
- ``"lru"``: clock of last use (mixtral-offloading style); the clock advances
  at every :func:`observe`, so in a shared pool it orders uses across layers.
- ``"lfu"``: accumulated activation count (MoE-Infinity style).
- ``"mrs"``: exponentially decayed gate score (HybriMoE's score-based MRS).
- ``"fifo"``: order of admission; uses do not refresh it (the paper's released code).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

EVICTION_POLICIES = ("score", "lru", "lfu", "mrs", "fifo")


@flax.struct.dataclass
class CacheState:
  """Bookkeeping of ``S`` expert slots serving ``G`` groups of ``E`` experts (keys ``g * E + e``).

  Attributes:
    slot_expert: ``[S] int32`` key held by each slot, -1 if empty.
    expert_slot: ``[G * E] int32`` slot of each key, -1 if not resident.
    score_hist: ``[n, G * E] float32`` per group, a ring buffer of its last
      ``n`` steps' mean gate score per expert.
    hist_len: ``[G] int32`` valid rows of each group's ring buffer.
    hist_pos: ``[G] int32`` row each group's next step writes.
    last_used: ``[G * E] int32`` clock at which each key was last used or
      admitted (-1: never); the LRU key.
    use_count: ``[G * E] float32`` steps in which each key was used (LFU).
    ema_score: ``[G * E] float32`` exponentially decayed mean gate score (MRS).
    loaded_at: ``[G * E] int32`` admission number of each key (FIFO), -1 never.
    admissions: ``int32`` keys admitted so far.
    step: ``int32`` the clock: steps observed so far, over all groups.
  """

  slot_expert: jax.Array
  expert_slot: jax.Array
  score_hist: jax.Array
  hist_len: jax.Array
  hist_pos: jax.Array
  last_used: jax.Array
  use_count: jax.Array
  ema_score: jax.Array
  loaded_at: jax.Array
  admissions: jax.Array
  step: jax.Array

  @property
  def num_slots(self) -> int:
    return self.slot_expert.shape[-1]

  @property
  def num_groups(self) -> int:
    return self.hist_len.shape[-1]

  @property
  def num_experts(self) -> int:
    """Experts per group, ``E``."""
    return self.expert_slot.shape[-1] // self.num_groups


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
  """``[S]`` slot -> key table to the ``[num_experts]`` key -> slot table."""
  slots = jnp.arange(slot_expert.shape[0], dtype=jnp.int32)
  index = jnp.where(slot_expert >= 0, slot_expert, num_experts)
  return jnp.full(num_experts, -1, jnp.int32).at[index].set(slots, mode="drop")


def init_cache_state(
  num_experts: int, num_slots: int, *, window: int = 8, initial_experts=None, num_groups: int = 1
) -> CacheState:
  """An empty (or pre-filled) cache.

  Args:
    num_experts: ``E``, routed experts of one layer.
    num_slots: ``S >= 1``, device expert slots.
    window: ``n``, steps of score history for the ``"score"`` policy.
    initial_experts: optional ``[S] int32`` key per slot (-1 empty), e.g.
      the most activated experts of a calibration run; they count as admitted
      in slot order.
    num_groups: ``G``, layers sharing the slots (1: a per-layer cache).

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
  if num_groups < 1:
    raise ValueError(f"num_groups must be >= 1 (got {num_groups}).")
  keys = num_groups * num_experts
  if initial_experts is None:
    slot_expert = jnp.full(num_slots, -1, jnp.int32)
  else:
    ids = np.asarray(initial_experts)
    placed = ids[ids >= 0]
    if ids.shape != (num_slots,) or np.any(ids >= keys) or np.any(ids < -1) or len(np.unique(placed)) != len(placed):
      raise ValueError(
        f"initial_experts must be {num_slots} distinct expert keys in [0, {keys}) or -1 for an empty slot (got {ids})."
      )
    slot_expert = jnp.asarray(ids, jnp.int32)
  expert_slot = _expert_slot_table(slot_expert, keys)
  return CacheState(
    slot_expert=slot_expert,
    expert_slot=expert_slot,
    score_hist=jnp.zeros((window, keys), jnp.float32),
    hist_len=jnp.zeros(num_groups, jnp.int32),
    hist_pos=jnp.zeros(num_groups, jnp.int32),
    last_used=jnp.full(keys, -1, jnp.int32),
    use_count=jnp.zeros(keys, jnp.float32),
    ema_score=jnp.zeros(keys, jnp.float32),
    loaded_at=jnp.array(expert_slot),  # initial experts count as admitted in slot order (FIFO)
    admissions=jnp.sum(slot_expert >= 0, dtype=jnp.int32),
    step=jnp.int32(0),
  )


def _block(x: jax.Array, state: CacheState, group) -> jax.Array:
  """The ``[E]`` block of a ``[G * E]`` array belonging to ``group`` (may be traced)."""
  e = state.num_experts
  return jax.lax.dynamic_slice_in_dim(x, group * e, e, axis=-1)


def _embed(block: jax.Array, state: CacheState, group, fill=0) -> jax.Array:
  """A group's ``[E]`` array placed in a ``[G * E]`` one, ``fill`` elsewhere."""
  if state.num_groups == 1:
    return block
  full = jnp.full(block.shape[:-1] + (state.num_groups * state.num_experts,), fill, block.dtype)
  return jax.lax.dynamic_update_slice_in_dim(full, block, group * state.num_experts, axis=-1)


def resident_mask(state: CacheState, group=0) -> jax.Array:
  """``[E] bool``: experts of ``group`` currently in a slot."""
  return _block(state.expert_slot, state, group) >= 0


def expert_slots(state: CacheState, group=0) -> jax.Array:
  """``[E] int32``: slot of each expert of ``group``, -1 if not resident."""
  return _block(state.expert_slot, state, group)


def window_score(state: CacheState) -> jax.Array:
  """``[G * E] float32``: mean gate score over each key's layer's history window (0 if empty)."""
  total = jnp.sum(state.score_hist, axis=0)
  steps = jnp.repeat(jnp.maximum(state.hist_len, 1), state.num_experts).astype(jnp.float32)
  return total / steps


def observe(
  state: CacheState,
  scores: jax.Array,
  used: jax.Array,
  valid: jax.Array | None = None,
  *,
  ema_decay: float = 0.9,
  group=0,
) -> CacheState:
  """Records one step of a layer (its ``group``) in the cache statistics.

  Args:
    state: the :class:`CacheState`.
    scores: ``[T, E]`` gate probabilities of all experts of the layer this step.
    used: ``[E] bool`` experts computed this step (e.g. ``Plan.needed``).
    valid: ``[T] bool``, False for padding tokens; default all valid.
    ema_decay: weight of the past in ``ema_score`` (may be traced).
    group: the layer's group (may be traced).

  Returns:
    The state with this step's mean score over valid tokens pushed into the
    group's window and blended into its ``ema_score``, ``last_used`` and
    ``use_count`` updated for ``used``, and the clock ``step`` advanced. A
    step without valid tokens leaves the score statistics unchanged.
  """
  if valid is None:
    valid = jnp.ones(scores.shape[:1], bool)
  valid = valid.astype(bool)
  n_valid = jnp.sum(valid)
  mean = (jnp.sum(jnp.where(valid[:, None], scores, 0), axis=0) / jnp.maximum(n_valid, 1)).astype(jnp.float32)
  has_tokens = n_valid > 0
  window = state.score_hist.shape[0]
  pos, length = state.hist_pos[group], state.hist_len[group]

  row = _embed(mean, state, group)
  mine = _embed(jnp.ones(mean.shape, bool), state, group, fill=False) & has_tokens
  score_hist = state.score_hist.at[pos].set(jnp.where(mine, row, state.score_hist[pos]))
  ema = ema_decay * state.ema_score + (1 - ema_decay) * row
  used = _embed(used.astype(bool), state, group, fill=False)
  return state.replace(
    score_hist=score_hist,
    hist_len=state.hist_len.at[group].set(jnp.where(has_tokens, jnp.minimum(length + 1, window), length)),
    hist_pos=state.hist_pos.at[group].set(jnp.where(has_tokens, (pos + 1) % window, pos)),
    last_used=jnp.where(used, state.step, state.last_used),
    use_count=state.use_count + used,
    ema_score=jnp.where(mine, ema, state.ema_score).astype(jnp.float32),
    step=state.step + 1,
  )


def eviction_key(state: CacheState, policy: str) -> jax.Array:
  """``[G * E] float32`` eviction key of each expert key; the lowest is evicted first."""
  if policy == "score":
    return window_score(state)
  if policy == "lru":
    return state.last_used.astype(jnp.float32)
  if policy == "lfu":
    return state.use_count
  if policy == "mrs":
    return state.ema_score
  if policy == "fifo":
    return state.loaded_at.astype(jnp.float32)
  raise ValueError(f"unknown eviction policy {policy!r}; choose one of {EVICTION_POLICIES}.")


def admit(
  state: CacheState,
  want: jax.Array,
  shield: jax.Array,
  priority: jax.Array | None = None,
  *,
  policy: str,
  max_loads: int,
  group=0,
  keep: jax.Array | None = None,
) -> tuple[CacheState, Admission]:
  """Admits wanted experts of one layer (its ``group``) into the cache, evicting by ``policy``.

  Wanted experts that are not resident are admitted one at a time, highest
  ``priority`` first (ties: lower expert id), at most ``max_loads`` of them.
  Each goes to an empty slot if there is one (lowest slot first), otherwise
  it evicts the resident key (of any group) with the lowest
  :func:`eviction_key` that is neither shielded nor wanted (wanted experts,
  resident or admitted in this call, are never evicted). Admission stops once
  no slot can be freed.

  Args:
    state: the :class:`CacheState`.
    want: ``[E] bool`` experts of the group to bring to the device.
    shield: ``[E] bool`` experts of the group that must stay (e.g. computed
      this layer).
    priority: ``[E] float`` admission order, higher first; default expert
      id order.
    policy: one of :data:`EVICTION_POLICIES` (static).
    max_loads: most experts admitted by this call (static).
    group: the layer's group (may be traced).
    keep: optional ``[G * E] bool`` keys of any group that must not be
      evicted (in a shared pool: another layer's experts still in use).

  Returns:
    ``(state, admission)``: slot tables updated (admitted experts get
    ``last_used = state.step`` and the next admission numbers), and the
    :class:`Admission` listing the copies to make (layer-local expert ids).
  """
  key = eviction_key(state, policy)
  if max_loads < 0:
    raise ValueError(f"max_loads must be >= 0 (got {max_loads}).")
  num_experts = state.num_experts
  num_keys = num_experts * state.num_groups
  offset = group * num_experts
  want = _embed(want.astype(bool), state, group, fill=False)
  to_admit = want & (state.expert_slot < 0)
  protected = want | _embed(shield.astype(bool), state, group, fill=False)
  if keep is not None:
    protected = protected | keep.astype(bool)
  if priority is None:
    priority = jnp.zeros(num_experts, jnp.float32)
  priority = _embed(jnp.asarray(priority, jnp.float32), state, group)
  ids = jnp.arange(num_keys)
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
    victim_slot = jnp.argmin(jnp.where(tied, slot_expert, num_keys))
    slot = jnp.where(empty.any(), jnp.argmax(empty), victim_slot)
    ok = to_admit[expert] & (empty.any() | evictable.any())
    # An expert left out means no slot is free: later ones skip as well.
    ok = ok & (count == i)
    victim = slot_expert[slot]
    new_expert_slot = expert_slot.at[jnp.where(victim >= 0, victim, num_keys)].set(-1, mode="drop")
    new_expert_slot = new_expert_slot.at[expert].set(slot)
    return (
      jnp.where(ok, slot_expert.at[slot].set(expert), slot_expert),
      jnp.where(ok, new_expert_slot, expert_slot),
      experts.at[i].set(jnp.where(ok, expert - offset, -1)),
      slots.at[i].set(jnp.where(ok, slot, -1)),
      count + ok,
    )

  padding = jnp.full(max_loads, -1, jnp.int32)
  slot_expert, expert_slot, experts, slots, count = jax.lax.fori_loop(
    0, min(max_loads, num_experts), body, (state.slot_expert, state.expert_slot, padding, padding, jnp.int32(0))
  )
  # Admitted keys get the next admission numbers in admission order (the FIFO clock).
  admitted_keys = jnp.where(experts >= 0, experts + offset, num_keys)
  number = state.admissions + jnp.arange(experts.shape[0], dtype=jnp.int32)
  state = state.replace(
    slot_expert=slot_expert,
    expert_slot=expert_slot,
    last_used=state.last_used.at[admitted_keys].set(state.step, mode="drop"),
    loaded_at=state.loaded_at.at[admitted_keys].set(number, mode="drop"),
    admissions=state.admissions + count,
  )
  return state, Admission(experts=experts, slots=slots, count=count)
