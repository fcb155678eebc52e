"""The decode engine: drives model, offload and scheduling one layer at a time.

Per step and MoE layer: attention and router run in one jitted call; the
policy's jitted `schedule_layer` decides substitution, copies, eviction and
CPU work; the engine issues the copies (`jax.device_put` into preallocated
slots), runs missed pairs on the CPU if the policy says so, optionally starts
the prefetch for the next MoE layer, and computes the experts from the slot
buffers in a second jitted call. Everything that computes is jitted; the
Python work per layer is one small device->host fetch of the decision.

With alpha = 0 every policy computes exactly the model's own experts, so the
tokens equal the resident model's (tested for every policy and budget).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.engine import sampling
from moejax.engine.schedule import COUNTERS, prefetch_layer, schedule_layer
from moejax.engine.stats import RunStats
from moejax.models import moe
from moejax.models.layers import attention_inputs
from moejax.models.model import Model, bucket, prompt_positions
from moejax.offload import cache as slot_cache
from moejax.offload.cpu import cpu_experts
from moejax.offload.store import HostExpertStore
from moejax.scheduling import balance, cache
from moejax.scheduling import similarity as similarity_lib
from moejax.scheduling.policies import PolicySpec, get_policy
from moejax.sim.trace import LayerEvent, StepTrace


@dataclasses.dataclass
class GenerationResult:
  """Output of `Engine.generate`.

  tokens: `[B, T + N]` prompt and generated (or forced) tokens.
  logprobs: `[B, N]` log-probability of each emitted token under the model.
  greedy: `[B, N]` bool, whether each emitted token was the argmax.
  stats: run statistics (see `moejax.engine.stats.RunStats.summary`).
  trace: per-step `StepTrace` records for the TPOT estimator.
  routing: with `record_routing`, per step a dict layer -> experts computed
    per valid token `[N_valid, k]` (after substitution); else empty.
  """

  tokens: np.ndarray
  logprobs: np.ndarray
  greedy: np.ndarray
  stats: dict[str, Any]
  trace: list[StepTrace]
  routing: list[dict[int, np.ndarray]]


# ----------------------------------------------------------------------------
# Jitted stages (graphdefs are static; one compilation per distinct layer kind)
# ----------------------------------------------------------------------------


_attention_inputs = jax.jit(attention_inputs, static_argnums=0)


@functools.cache
def _jit_bound(fn, *static, donate: tuple[int, ...] = ()):
  """`fn` jitted with its leading static arguments (graphdefs) bound.

  Binding once per engine keeps the hashing of graphdefs out of every call;
  the cache makes engines over equal graphdefs share compilations.
  """
  return jax.jit(functools.partial(fn, *static), donate_argnums=donate)


class _LayerFns(NamedTuple):
  """A layer's jitted stages, each called with the layer's state first."""

  attend_dense: Callable
  attend_route: Callable
  peek_scores: Callable
  gate_scores: Callable
  finish: Callable


def _layer_fns(graphdef, act: str) -> _LayerFns:
  return _LayerFns(
      attend_dense=_jit_bound(_attend_dense, graphdef, donate=(3,)),
      attend_route=_jit_bound(_attend_route, graphdef, donate=(3,)),
      peek_scores=_jit_bound(_peek_scores, graphdef),
      gate_scores=_jit_bound(_gate_scores, graphdef),
      finish=_jit_bound(_finish, graphdef, act),
  )


def _embed(graphdef, state, ids):
  return nnx.merge(graphdef, state).embed(ids)


def _last_logits(graphdef, state, h):
  return nnx.merge(graphdef, state).logits(h[:, -1:])[:, 0]


def _next_token_logprobs(graphdef, state, h, ids):
  """h `[B, T, D]`, ids `[B, T]` -> log p(ids[:, t+1] | ids[:, :t+1]) and argmax flags, both `[B, T-1]`."""
  logits = nnx.merge(graphdef, state).logits(h[:, :-1]).astype(jnp.float32)
  targets = ids[:, 1:]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  return logp, jnp.argmax(logits, axis=-1) == targets


def _attend_dense(graphdef, state, h, inputs, kv):
  layer = nnx.merge(graphdef, state)
  h, kv = layer.attend(h, inputs, kv)
  return layer.dense_ffn(h), kv


def _attend_route(graphdef, state, h, inputs, kv):
  layer = nnx.merge(graphdef, state)
  h, kv = layer.attend(h, inputs, kv)
  x = layer.ffn_input(h)
  return h, x, layer.router_scores(x), kv


def _peek_scores(graphdef, state, h, inputs, kv):
  """Router scores of a layer for hidden states h, without keeping the cache write."""
  layer = nnx.merge(graphdef, state)
  h, _ = layer.attend(h, inputs, kv)
  return layer.router_scores(layer.ffn_input(h))


def _gate_scores(graphdef, state, x):
  return nnx.merge(graphdef, state).router_scores(x)


def _finish(graphdef, act, state, h, x, buffers, slots, mix, extra):
  layer = nnx.merge(graphdef, state)
  routed = moe.routed_experts(x, buffers, slots, mix, act) + extra.astype(jnp.float32)
  return layer.finish_moe(h, x, routed.astype(x.dtype))


@functools.partial(jax.jit, static_argnums=0)
def _warm_admit(policy, state, scores, valid, selected):
  """Admits the experts a prompt used (`selected` `[N, k]`), most important first; returns (state, admission)."""
  e = scores.shape[-1]
  used = jnp.zeros(e, bool).at[selected].max(jnp.broadcast_to(valid[:, None], selected.shape))
  priority = jnp.max(jnp.where(valid[:, None], scores, 0.0), axis=0)
  state, adm = cache.admit(state, used, jnp.zeros(e, bool), priority, policy=policy,
                           max_loads=min(state.num_slots, e))
  return cache.observe(state, scores, used, valid), adm


_schedule = jax.jit(schedule_layer, static_argnums=(0, 1, 2))
_prefetch = jax.jit(prefetch_layer, static_argnums=(0, 1))


def _tree_nbytes(tree) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


class Engine:
  """Offloaded MoE decoding under a named scheduling policy.

  Args:
    model: a `moejax.Model`; load it with `experts="host"` so routed experts
      never all sit on the device (`Engine.from_pretrained` does this).
    policy: a registered policy name (`moejax.scheduling.POLICIES`) or a
      `PolicySpec`.
    alpha: substitution threshold (>= 0); 0 computes the model exactly.
    cache_slots / cache_bytes / cache_fraction: the device expert cache, as
      slots per MoE layer, a total byte budget, or a fraction of the experts
      (at most one; default: every expert).
    window: score-history steps for score-based eviction.
    similarity: `[L, E, E]` (or `[E, E]` for every layer) similarity for the
      "similarity" and "buddy" substitutions; default router-weight cosine.
    substitute_weight: "own" or "replaced" (see `scheduling.route`).
    cache_prior_strength: log-score bias toward resident experts for the
      cache_prior policy; default log(1 + alpha), so alpha = 0 is exact.
    policy_in_prefill: schedule the prompt's tokens too (default: the prompt
      is computed exactly with every expert streamed in, and warms the cache).
    host_memory_kind: "numpy" or "pinned_host" for the host expert store.
    static_experts: `[L][S]` resident sets for the static policy (default:
      the most used experts of the first prompt).
    profile: block after each stage to time attention, plan, copies, experts,
      CPU work and prefetch separately (slower; off by default).
    record_routing: keep the experts computed per token, layer and step in
      `GenerationResult.routing` (for co-activation similarity and tests).
  """

  def __init__(
      self,
      model: Model,
      *,
      policy: str | PolicySpec = "smoe",
      alpha: float = 0.0,
      cache_slots: int | None = None,
      cache_bytes: int | None = None,
      cache_fraction: float | None = None,
      window: int = 8,
      similarity=None,
      substitute_weight: str = "own",
      cache_prior_strength: float | None = None,
      policy_in_prefill: bool = False,
      host_memory_kind: str = "numpy",
      static_experts: Sequence[Sequence[int]] | None = None,
      profile: bool = False,
      record_routing: bool = False,
  ):
    alpha = float(alpha)
    if not alpha >= 0:
      raise ValueError(f"alpha must be >= 0 (got {alpha}); alpha = 0 computes the model exactly.")
    self.spec = policy if isinstance(policy, PolicySpec) else get_policy(policy)
    # The jitted stages see the components only, so policies with equal components share compilations.
    self._jit_spec = dataclasses.replace(self.spec, name="")
    config = model.config
    if not config.moe_layer_ids:
      raise ValueError(f"The model ({config.model_type}) has no MoE layers; there is nothing to schedule.")
    self.model, self.config = model, config
    self.alpha = jnp.float32(alpha)
    self.substitute_weight = substitute_weight
    self.prior_strength = jnp.float32(np.log1p(alpha) if cache_prior_strength is None else cache_prior_strength)
    self.policy_in_prefill = policy_in_prefill
    self.profile = profile
    self.record_routing = record_routing
    k, e = config.num_experts_per_tok, config.num_experts
    dtype_bytes = jnp.dtype(model.dtype).itemsize
    if self.spec.cache and not self.spec.layerwise:
      slots = slot_cache.resolve_cache_slots(
          config, cache_slots=cache_slots, cache_bytes=cache_bytes, cache_fraction=cache_fraction,
          dtype_bytes=dtype_bytes,
      )
    else:
      slots = e
    if self.spec.cpu_compute == "always" and not self.spec.static and self.spec.prefetch is None:
      slots = 0  # nothing is ever loaded: no device cache at all
    if self.spec.cache and self.spec.cpu_compute == "never" and not self.spec.layerwise and slots < k:
      raise ValueError(
          f"cache_slots={slots} is below top-k={k} and policy {self.spec.name!r} never computes on the CPU: "
          f"raise the cache to >= {k} slots per layer, or use a policy with CPU compute (e.g. 'smoe', 'cpu')."
      )
    self.num_slots = slots
    self.window = window

    self.layer_defs = [nnx.split(layer) for layer in model.decoder.layers]
    self.fns = [_layer_fns(graphdef, config.hidden_act) for graphdef, _ in self.layer_defs]
    self.embed_fn = _jit_bound(_embed, model.graphdef)
    self.logits_fn = _jit_bound(_last_logits, model.graphdef)
    self.logprobs_fn = _jit_bound(_next_token_logprobs, model.graphdef)
    self.decoder_state = model.state
    if self.spec.cache:
      self.store = HostExpertStore(model.experts, host_memory_kind)
    else:
      self.store = None
      self.resident_experts = model.experts_on_device()
    self.sim = self._similarity(similarity)
    self.static_experts = static_experts
    self.dense_bytes = [_tree_nbytes(st) for _, st in self.layer_defs]  # routed experts are not in the module
    self.expert_bytes = [
        config.expert_param_count() * dtype_bytes if config.moe_layers[i] else 0 for i in range(config.num_layers)
    ]
    self.head_bytes = _tree_nbytes(nnx.state(model.decoder.norm)) + config.vocab_size * config.hidden_size * dtype_bytes
    self.reset()

  @classmethod
  def from_pretrained(cls, path, *, dtype="float32", **kwargs) -> Engine:
    """Loads a checkpoint with routed experts in host memory and builds an Engine."""
    from moejax.checkpoints.loader import load

    return cls(load(path, dtype=dtype, experts="host"), **kwargs)

  # --------------------------------------------------------------------------
  # State
  # --------------------------------------------------------------------------

  def _similarity(self, sim):
    if self.spec.substitution not in ("similarity", "buddy"):
      return {}
    if sim is None:
      sim = {l: similarity_lib.router_cosine(self.layer_defs[l][1]["mlp"]["router"]["weight"][...].T)
             for l in self.config.moe_layer_ids}
      return sim
    sim = np.asarray(sim, np.float32)
    if sim.ndim == 2:
      return {l: jnp.asarray(sim) for l in self.config.moe_layer_ids}
    if sim.shape[0] == self.config.num_layers:
      return {l: jnp.asarray(sim[l]) for l in self.config.moe_layer_ids}
    return {l: jnp.asarray(s) for l, s in zip(self.config.moe_layer_ids, sim)}

  def reset(self) -> None:
    """Empties the expert cache and forgets score history and measured costs."""
    e, s = self.config.num_experts, self.num_slots
    self.states: dict[int, cache.CacheState | None] = {}
    self.buffers: dict[int, moe.ExpertWeights | None] = {}
    for l in self.config.moe_layer_ids:
      if not self.spec.cache:
        self.states[l] = cache.init_cache_state(e, e, window=self.window, initial_experts=np.arange(e))
        self.buffers[l] = self.resident_experts[l]
      elif self.spec.layerwise:
        self.states[l], self.buffers[l] = None, None
      elif s == 0:  # no device cache: one zero slot that no pair ever reads
        self.states[l], self.buffers[l] = None, slot_cache.empty_slots(self.config, 1, self.model.dtype)
      else:
        self.states[l] = cache.init_cache_state(e, s, window=self.window)
        self.buffers[l] = slot_cache.empty_slots(self.config, s, self.model.dtype)
    if self.spec.static and self.static_experts is not None:
      self._install_static(self.static_experts)
    self.static_ready = self.static_experts is not None
    self.costs = balance.init_cost_model()

  def _install_static(self, sets: Sequence[Sequence[int]]) -> None:
    for l, experts in zip(self.config.moe_layer_ids, sets):
      experts = np.asarray(experts, np.int32)[: self.num_slots]
      ids = np.full(self.num_slots, -1, np.int32)
      ids[: len(experts)] = experts
      self.states[l] = cache.init_cache_state(self.config.num_experts, self.num_slots, window=self.window,
                                              initial_experts=ids)
      self.buffers[l] = slot_cache.write_slots(self.buffers[l], np.arange(len(experts)),
                                               self.store.to_device(l, experts))

  # --------------------------------------------------------------------------
  # One MoE layer
  # --------------------------------------------------------------------------

  def _copy_in(self, l: int, experts: np.ndarray, slots: np.ndarray) -> None:
    take = experts >= 0
    if take.any():
      self.buffers[l] = slot_cache.write_slots(self.buffers[l], slots[take], self.store.to_device(l, experts[take]))

  def _moe_layer(self, l, h, x, scores, valid, inputs, caches, run, prefetched, exact):
    """Runs the expert half of MoE layer l; returns (h, prefetched-for-next-layer or None)."""
    config, spec = self.config, self.spec
    lstate = self.layer_defs[l][1]
    timings = {}
    t0 = time.perf_counter()
    bias = lstate["mlp"]["router"].get("bias")
    bias = None if bias is None else bias[...]
    if exact or spec.layerwise:
      # Every expert streamed in (exact prefill; layerwise policy).
      e = config.num_experts
      buffers = self.buffers[l] if not spec.cache else self.store.to_device(l, np.arange(e))
      selected, mix = moe.own_routing(config, scores, bias)
      slots = jnp.where(valid[:, None], selected, -1)
      h = self.fns[l].finish(lstate, h, x, buffers, slots, mix, jnp.zeros(x.shape, jnp.float32))
      sel = np.asarray(selected)[np.asarray(valid)]
      used = np.unique(sel)
      if self.record_routing:
        run.record_routing(l, sel)
      run.add_layer_event(
          LayerEvent(layer=l, tokens=int(np.asarray(valid).sum()), dense_bytes=self.dense_bytes[l],
                     expert_bytes=self.expert_bytes[l], hits=len(used),
                     layerwise_loads=e if spec.cache else 0, gpu_pairs=sel.size, cpu_pairs=0),
          bytes_to_device=e * self.expert_bytes[l] if spec.cache else 0,
          counts={"pairs": sel.size, "pairs_hit": sel.size, "hits": len(used), "gpu_pairs": sel.size},
      )
      if exact and self.states.get(l) is not None:
        self._warm_cache(l, scores, valid, selected, buffers)
      return h, None

    state = self.states[l]
    sim = self.sim.get(l)
    if prefetched is None:
      prefetched = jnp.zeros(config.num_experts, bool)
    d = _schedule(config, self._jit_spec, self.substitute_weight, scores, valid, state, self.costs, self.alpha, sim, bias,
                  prefetched, self.prior_strength)
    self.states[l] = d.state
    loads, load_slots, counters = jax.device_get((d.loads, d.load_slots, d.counters))
    if self.record_routing:
      run.record_routing(l, np.asarray(d.experts)[np.asarray(valid)])
    timings["plan"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    self._copy_in(l, loads, load_slots)
    n_loads = int((loads >= 0).sum())
    if n_loads and (self.profile or spec.balance):
      jax.block_until_ready(self.buffers[l])
      timings["copy"] = time.perf_counter() - t1
      self.costs = balance.update_costs(self.costs, load_s=timings["copy"], n_load=n_loads)

    # Prefetch for the next MoE layer, overlapping this layer's expert compute.
    next_prefetched = None
    nxt = self._next_moe_layer(l)
    if spec.prefetch is not None and nxt is not None and self.states[nxt] is not None:
      tp = time.perf_counter()
      next_prefetched = self._start_prefetch(l, nxt, h, x, valid, inputs, caches, d, run)
      if self.profile:
        jax.block_until_ready(self.buffers[nxt])
        timings["prefetch"] = time.perf_counter() - tp

    extra = jnp.zeros(x.shape, jnp.float32)
    counts = dict(zip(COUNTERS, (int(c) for c in counters)))
    if counts["cpu_pairs"]:
      t2 = time.perf_counter()
      experts, mix, on_cpu, x_host = jax.device_get((d.experts, d.mix, d.on_cpu, x))
      extra = jnp.asarray(cpu_experts(x_host, self.store.layers[l], experts, mix, on_cpu, config.hidden_act))
      timings["cpu"] = time.perf_counter() - t2
      if spec.balance:
        self.costs = balance.update_costs(self.costs, cpu_s=timings["cpu"], n_cpu=counts["cpu_experts"])

    t3 = time.perf_counter()
    h = self.fns[l].finish(lstate, h, x, self.buffers[l], d.slots, d.mix, extra)
    if self.profile:
      jax.block_until_ready(h)
      timings["experts"] = time.perf_counter() - t3
    run.add_layer_event(
        LayerEvent(
            layer=l, tokens=int(np.asarray(valid).sum()), dense_bytes=self.dense_bytes[l],
            expert_bytes=self.expert_bytes[l], hits=counts["hits"], demand_loads=counts["demand_loads"],
            prefetch_loads=counts["prefetched"], prefetch_used=counts["prefetch_used"],
            cpu_experts=counts["cpu_experts"], substituted=counts["substituted"],
            gpu_pairs=counts["gpu_pairs"], cpu_pairs=counts["cpu_pairs"], measured=timings,
            predictor_bytes=run.pending_predictor_bytes(l),
        ),
        bytes_to_device=n_loads * self.expert_bytes[l],
        counts=counts,
    )
    return h, next_prefetched

  def _warm_cache(self, l, scores, valid, selected, streamed: moe.ExpertWeights) -> None:
    """After an exact prefill: fill the layer's cache with the prompt's most important experts.

    The experts come from `streamed` `[E, ...]`, the copies the prefill just
    made, so warming the cache moves nothing more across the host link.
    """
    if self.spec.static:
      return
    self.states[l], adm = _warm_admit(self.spec.eviction or "score", self.states[l], scores, valid, selected)
    experts, slots = jax.device_get((adm.experts, adm.slots))
    take = experts >= 0
    if take.any():
      chosen = jnp.asarray(experts[take])
      self.buffers[l] = slot_cache.write_slots(self.buffers[l], slots[take],
                                               moe.ExpertWeights(*(w[chosen] for w in streamed)))

  def _next_moe_layer(self, l: int) -> int | None:
    later = [m for m in self.config.moe_layer_ids if m > l]
    return later[0] if later else None

  def _start_prefetch(self, l, nxt, h, x, valid, inputs, caches, d, run):
    """Predicts layer nxt's scores and starts copying its predicted top-score experts."""
    spec, config = self.spec, self.config
    lstate = self.layer_defs[l][1]
    nstate = self.layer_defs[nxt][1]
    if spec.prefetch == "provisional":
      # Provisional output of layer l: shared experts + routed experts already on the device.
      prov = self.fns[l].finish(lstate, h, x, self.buffers[l], d.slots, d.mix,
                     jnp.zeros(x.shape, jnp.float32))
      pred = self.fns[nxt].peek_scores(nstate, prov, inputs, caches[nxt])
      run.note_predictor_bytes(l, self.dense_bytes[nxt])
    elif spec.prefetch == "gate":
      pred = self.fns[nxt].gate_scores(nstate, x)
    else:  # activation counts
      pred = jnp.zeros((x.shape[0], config.num_experts), jnp.float32)
    nbias = nstate["mlp"]["router"].get("bias")
    nbias = None if nbias is None else nbias[...]
    state, adm, prefetched = _prefetch(config, self._jit_spec, pred, valid, self.states[nxt], self.alpha, nbias)
    self.states[nxt] = state
    experts, slots = jax.device_get((adm.experts, adm.slots))
    self._copy_in(nxt, experts, slots)
    run.add_prefetch_bytes(nxt, int((experts >= 0).sum()) * self.expert_bytes[nxt])
    return prefetched

  # --------------------------------------------------------------------------
  # Steps and generation
  # --------------------------------------------------------------------------

  def _maybe_calibrate_static(self, ids, valid, positions) -> None:
    """Static policy without given sets: keep each layer's most used experts of this prompt."""
    if not self.spec.static or self.static_ready:
      return
    counts = self._prefill_counts(ids, valid, positions)
    self._install_static([np.argsort(-counts[l], kind="stable")[: self.num_slots] for l in self.config.moe_layer_ids])
    self.static_ready = True

  def _prefill_counts(self, ids, valid, positions) -> dict[int, np.ndarray]:
    """Expert selection counts `[E]` per MoE layer over the prompt's valid tokens (one prefill step)."""
    run = self.new_run_stats()
    record, self.record_routing = self.record_routing, True
    try:
      self._step(ids, positions, valid, 0, self.model.init_caches(*ids.shape), run, "prefill")
    finally:
      self.record_routing = record
    return {l: np.bincount(sel.ravel(), minlength=self.config.num_experts) for l, sel in run.routing[0].items()}

  def _step(self, ids, positions, valid, index, caches, run, kind, score=False):
    """One forward step of T tokens per sequence.

    Returns last-position logits `[B, V]`, or with `score` the next-token
    log-probabilities and argmax flags of the step's own tokens (`[B, T-1]` each).
    """
    t0 = time.perf_counter()
    run.begin_step(kind, tokens=int(np.asarray(valid).sum()))
    exact = kind == "prefill" and not self.policy_in_prefill
    h = self.embed_fn(self.decoder_state, ids)
    inputs = _attention_inputs(self.config, positions, valid, index)
    vflat = valid.reshape(-1)
    prefetched = None
    for l, (_, lstate) in enumerate(self.layer_defs):
      if not self.config.moe_layers[l]:
        h, caches[l] = self.fns[l].attend_dense(lstate, h, inputs, caches[l])
        run.add_layer_event(LayerEvent(layer=l, tokens=int(np.asarray(valid).sum()), dense_bytes=self.dense_bytes[l],
                                       expert_bytes=0), bytes_to_device=0, counts={})
        continue
      ta = time.perf_counter()
      h, x, scores, caches[l] = self.fns[l].attend_route(lstate, h, inputs, caches[l])
      if self.profile:
        jax.block_until_ready(h)
        run.add_time("attention", time.perf_counter() - ta)
      h, prefetched = self._moe_layer(l, h, x, scores, vflat, inputs, caches, run, prefetched, exact)
    if score:
      out = self.logprobs_fn(self.decoder_state, h, ids)
    else:
      out = self.logits_fn(self.decoder_state, h)
    out = jax.block_until_ready(out)
    run.end_step(time.perf_counter() - t0, head_bytes=self.head_bytes)
    return out

  def new_run_stats(self) -> RunStats:
    """An empty `RunStats` for this engine, to accumulate several calls (`run_stats=`) into."""
    return RunStats(self.config, dtype_bytes=jnp.dtype(self.model.dtype).itemsize)

  def _prompt(self, input_ids, attention_mask) -> tuple[np.ndarray, jax.Array, jax.Array]:
    """(ids `[B, T]` int32, valid `[B, T]`, rotary positions `[B, T]`) of a left-padded batch."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, tokens], got shape {ids.shape}.")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    valid = jnp.asarray(mask)
    return ids, valid, prompt_positions(valid)

  def score(self, input_ids, attention_mask=None, *, run_stats: RunStats | None = None):
    """Scores a batch in one prefill step (exact unless `policy_in_prefill`).

    Args:
      input_ids: `[B, T]` left-padded sequences.
      attention_mask: `[B, T]` 1 for real tokens.
      run_stats: a `RunStats` to accumulate into across calls (default: a fresh one).

    Returns:
      (logprobs `[B, T-1]` of each next token given the tokens before it,
       greedy `[B, T-1]` bool, whether that token was the argmax). Positions
      whose target is padding are meaningless.
    """
    ids, valid, positions = self._prompt(input_ids, attention_mask)
    self._maybe_calibrate_static(jnp.asarray(ids), valid, positions)
    run = self.new_run_stats() if run_stats is None else run_stats
    caches = self.model.init_caches(*ids.shape)
    logp, greedy = self._step(jnp.asarray(ids), positions, valid, 0, caches, run, "prefill", score=True)
    return np.asarray(logp), np.asarray(greedy)

  def generate(
      self,
      input_ids,
      max_new_tokens: int,
      attention_mask=None,
      *,
      forced_tokens=None,
      forced_mask=None,
      temperature: float = 0.0,
      top_p: float = 1.0,
      seed: int = 0,
      stop: Callable[[np.ndarray], bool] | None = None,
      run_stats: RunStats | None = None,
      cache_length: int | None = None,
  ) -> GenerationResult:
    """Decodes N tokens for a batch of B left-padded prompts.

    Args:
      input_ids: `[B, T]` prompts (left padded where attention_mask is 0).
      max_new_tokens: N.
      attention_mask: `[B, T]` 1 for real tokens.
      forced_tokens: optional `[B, N]` tokens to feed instead of sampling
        (teacher forcing: scoring sees exactly the decode path).
      forced_mask: optional `[B, N]`, 0 where `forced_tokens` is padding (right
        padding of shorter continuations). A decode step feeds token n of a
        row as padding (ignored by scheduling, the cache and the stats) unless
        token n + 1 is real, so each row runs exactly the steps its own
        continuation needs; logprobs at padded positions are meaningless.
      temperature: 0 for greedy; else sampling with `top_p` and `seed`.
      stop: optional `stop(tokens [B, n]) -> bool` called on the tokens
        emitted so far; returning True ends decoding early (fewer than N).
      run_stats: a `RunStats` to accumulate into across calls (default: a
        fresh one); `stats`, `trace` and `routing` then cover every call.
      cache_length: KV cache rows, >= T + N (default: T + N rounded up to a
        power of two). Calls with different T + N but one cache_length share
        the decode compilations.

    Returns:
      A `GenerationResult`.
    """
    ids, valid, positions = self._prompt(input_ids, attention_mask)
    b, t = ids.shape
    if forced_tokens is not None:
      forced_tokens = np.asarray(forced_tokens, np.int32)
      if forced_tokens.shape != (b, max_new_tokens):
        raise ValueError(f"forced_tokens must be [{b}, {max_new_tokens}], got {forced_tokens.shape}.")
    feed = np.ones((b, max_new_tokens), bool)
    if forced_mask is not None:
      forced_mask = np.asarray(forced_mask).astype(bool)
      if forced_tokens is None or forced_mask.shape != forced_tokens.shape:
        raise ValueError("forced_mask needs forced_tokens of the same shape [B, N].")
      feed[:, :-1] = forced_mask[:, 1:]
    self._maybe_calibrate_static(jnp.asarray(ids), valid, positions)
    run = self.new_run_stats() if run_stats is None else run_stats
    if cache_length is not None and cache_length < t + max_new_tokens:
      raise ValueError(f"cache_length={cache_length} is below prompt + new tokens = {t + max_new_tokens}.")
    # Bucketed cache length: calls of many sizes share the decode compilations.
    caches = self.model.init_caches(b, cache_length or bucket(t + max_new_tokens))
    key = jax.random.PRNGKey(seed)
    logits = self._step(jnp.asarray(ids), positions, valid, 0, caches, run, "prefill")
    out, logps, greedy = [], [], []
    next_pos = positions[:, -1:] + 1
    for step in range(max_new_tokens):
      key, sub = jax.random.split(key)
      if forced_tokens is not None:
        token = jnp.asarray(forced_tokens[:, step])
      else:
        token = sampling.sample(logits, sub, temperature=temperature, top_p=top_p)
      logp = jax.nn.log_softmax(logits, axis=-1)
      # np.array copies: a zero-copy view would keep each step's device buffers alive.
      logps.append(np.array(jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]))
      greedy.append(np.array(jnp.argmax(logits, -1) == token))
      out.append(np.array(token))
      if step == max_new_tokens - 1 or (stop is not None and stop(np.stack(out, 1))):
        break
      logits = self._step(token[:, None], next_pos, jnp.asarray(feed[:, step, None]), t + step, caches, run, "decode")
      next_pos = next_pos + 1
    gen = np.stack(out, 1) if out else np.zeros((b, 0), np.int32)
    return GenerationResult(
        tokens=np.concatenate([ids, gen.astype(np.int32)], axis=1),
        logprobs=np.stack(logps, 1) if logps else np.zeros((b, 0), np.float32),
        greedy=np.stack(greedy, 1) if greedy else np.zeros((b, 0), bool),
        stats=run.summary(),
        trace=run.trace,
        routing=run.routing,
    )
