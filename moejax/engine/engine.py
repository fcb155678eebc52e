"""The decode engine: runs a model with its routed experts in host memory under a scheduling policy.

Each forward step is one jitted program (`moejax.engine.stages.forward`):
layer by layer, the policy plans each MoE layer from its router scores
(substitution, copies with eviction, CPU work), the layer's device cache
slots are filled from the `pinned_host` expert store inside the program, pairs
left off the device run on the host (`compute_on("device_host")`), and the
experts are read from the slots. The host dispatches one call per step and
reads back one small int32 array of counters. `generate` runs the whole decode
(sampling included) as one program, a scan of that step, and reads every step's
counters at the end; with a `stop` callback, or `profile=True` (the same step
stage by stage, blocked on and timed per layer), the host drives step by step.

With alpha = 0 every policy computes exactly the model's own experts, so the
tokens equal the resident model's (tested for every policy and budget).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.engine import sampling
from moejax.engine.costs import resolve_costs
from moejax.engine.schedule import COUNTERS
from moejax.engine.stages import (
  Edges,
  Records,
  Segment,
  StagedOps,
  StepPlan,
  forward,
  fused_decode,
  fused_forward,
  split_module,
)
from moejax.engine.stats import RunStats
from moejax.models import moe
from moejax.models.layers import attention_inputs
from moejax.models.model import Model, bucket, prompt_positions
from moejax.offload import cache as slot_cache
from moejax.offload.cpu import host_experts
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


_emit = jax.jit(sampling.emit, static_argnames=("temperature", "top_p"))
_attention_inputs = jax.jit(attention_inputs, static_argnums=0)


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
    static_experts: `[L][S]` resident sets for the static policy (default:
      the most used experts of the first prompt).
    costs: per-expert copy and CPU costs of the balance split (smoe, mrs):
      "calibrate" (measured once on this machine, `calibrate_costs`), a
      hardware profile name, or fixed seconds "LOAD_S,CPU_S" / (load_s, cpu_s);
      see `moejax.engine.costs`. Fixed costs make runs repeatable.
    profile: run each step stage by stage, blocked on and timed per layer
      (attention, plan, prefetch, copy, cpu, experts, head); slower. With a
      balance policy and costs="calibrate" the split then uses the copy and
      CPU costs measured in every step.
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
      static_experts: Sequence[Sequence[int]] | None = None,
      costs="calibrate",
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

    self.layer_mods = [split_module(layer) for layer in model.decoder.layers]
    self.edges = split_module(Edges(model.decoder))
    # Segment i runs from MoE layer prev (None: the embedding) through the dense layers in between to MoE layer
    # next (None: the output head); see `moejax.engine.stages`.
    moe_ids = list(config.moe_layer_ids)
    bounds = [None, *moe_ids, None]
    self.segments = []
    for prev, nxt in itertools.pairwise(bounds):
      lo = 0 if prev is None else prev + 1
      hi = config.num_layers if nxt is None else nxt
      self.segments.append((prev, tuple(range(lo, hi)), nxt))
    self._jits: dict[tuple, Callable] = {}  # this engine's jitted steps / stages, freed with it
    if self.spec.cache:
      self.store = HostExpertStore(model.experts)
    else:
      self.store = None
      self.resident_experts = model.experts_on_device()
    self.sim = self._similarity(similarity)
    # Per-engine constants of every step call: module structure and weights, host store and similarity per layer.
    self._layer_defs = tuple(d for d, _ in self.layer_mods)
    self._layer_leaves = [lv for _, lv in self.layer_mods]
    self._store = {l: None if self.store is None else self.store.layers[l] for l in config.moe_layer_ids}
    self._sims = {l: self.sim.get(l) for l in config.moe_layer_ids}
    self.static_experts = static_experts
    self.dense_bytes = [_tree_nbytes(leaves) for _, leaves in self.layer_mods]  # routed experts are not in the module
    self.expert_bytes = [
        config.expert_param_count() * dtype_bytes if config.moe_layers[i] else 0 for i in range(config.num_layers)
    ]
    self.head_bytes = _tree_nbytes(nnx.state(model.decoder.norm)) + config.vocab_size * config.hidden_size * dtype_bytes
    # Fixed costs, or None until `calibrate_costs` runs before the first scheduled step.
    self.fixed_costs = resolve_costs(costs, config)
    self.calibrated_costs: balance.CostModel | None = self.fixed_costs
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
      layers = self.model.decoder.layers
      sim = {l: similarity_lib.router_cosine(layers[l].mlp.router.weight[...].T) for l in self.config.moe_layer_ids}
      return sim
    sim = np.asarray(sim, np.float32)
    if sim.ndim == 2:
      return {l: jnp.asarray(sim) for l in self.config.moe_layer_ids}
    if sim.shape[0] == self.config.num_layers:
      return {l: jnp.asarray(sim[l]) for l in self.config.moe_layer_ids}
    return {l: jnp.asarray(s) for l, s in zip(self.config.moe_layer_ids, sim)}

  def reset(self) -> None:
    """Empties the expert cache and forgets score history and the costs measured in profile mode."""
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
    self.costs = balance.init_cost_model() if self.calibrated_costs is None else self.calibrated_costs

  def _install_static(self, sets: Sequence[Sequence[int]]) -> None:
    for l, experts in zip(self.config.moe_layer_ids, sets):
      experts = np.asarray(experts, np.int32)[: self.num_slots]
      ids = np.full(self.num_slots, -1, np.int32)
      ids[: len(experts)] = experts
      self.states[l] = cache.init_cache_state(self.config.num_experts, self.num_slots, window=self.window,
                                              initial_experts=ids)
      self.buffers[l] = slot_cache.write_slots(self.buffers[l], self.store.layers[l], jnp.asarray(experts),
                                               jnp.arange(len(experts), dtype=jnp.int32))

  def calibrate_costs(self, repeats: int = 5) -> balance.CostModel:
    """Measures the per-expert costs the balance split uses: one copy into a slot and one CPU expert.

    Times (median of `repeats`) the engine's own kernels on the first MoE
    layer: `fill_slots` of k experts from the host store into scratch slots,
    and `host_experts` of k pairs for one token. The fused step cannot time
    its parts, so it uses these; profile mode keeps measuring every step.
    """
    config = self.config
    l, k = config.moe_layer_ids[0], config.num_experts_per_tok
    ids = jnp.arange(k, dtype=jnp.int32)
    scratch = [slot_cache.empty_slots(config, k, self.model.dtype)]
    x = jnp.zeros((1, config.hidden_size), self.model.dtype)
    cpu = jax.jit(host_experts, static_argnames="act")

    def fill():
      scratch[0] = jax.block_until_ready(slot_cache.write_slots(scratch[0], self.store.layers[l], ids, ids))

    def compute():
      jax.block_until_ready(cpu(x, self.store.layers[l], ids[None], jnp.ones((1, k)), jnp.ones((1, k), bool),
                                act=config.hidden_act))

    def median(fn):
      fn()  # compile
      times = []
      for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
      return float(np.median(times))

    return balance.update_costs(balance.init_cost_model(), load_s=median(fill), n_load=k, cpu_s=median(compute),
                                n_cpu=k)

  def _measure_costs_once(self, exact: bool) -> None:
    """Before the first scheduled step of a balance policy's fused path: `calibrate_costs` (kept across `reset`)."""
    if self.spec.balance and not exact and not self.profile and self.calibrated_costs is None:
      self.costs = self.calibrated_costs = self.calibrate_costs()

  # --------------------------------------------------------------------------
  # Steps and generation
  # --------------------------------------------------------------------------

  def _step_plan(self, exact: bool, score: bool) -> StepPlan:
    spec = self.spec
    # Pairs run on the CPU when the policy says so, or when a batch needs more experts than a layer has slots.
    cpu = spec.cpu_compute != "never" or self.num_slots < self.config.num_experts
    segments = []
    for prev, dense, nxt in self.segments:
      schedules = not exact and nxt is not None
      prefetch = spec.prefetch if schedules and prev is not None and self.states.get(nxt) is not None else None
      segments.append(Segment(prev, dense, nxt, prefetch, schedules and cpu))
    return StepPlan(self.config, self._jit_spec, self.substitute_weight, tuple(segments), exact,
                    warm=exact and spec.cache and not spec.layerwise and not spec.static, score=score,
                    keep_experts=exact or self.record_routing)

  def _forward(self, plan: StepPlan, ids, inputs, vflat, caches, layer_times):
    """Runs `stages.forward`: one jitted call, or staged and timed with profile (times into `layer_times`)."""
    args = (ids, inputs, vflat, caches, self.states, self.buffers, self._store, self.costs, self.alpha, self._sims,
            self.prior_strength)
    if self.profile:

      def timer(layer, name, seconds):
        layer_times.setdefault(layer, collections.defaultdict(float))[name] += seconds

      ops = StagedOps(self.config.hidden_act, self.layer_mods, self.edges, self._jits, timer=timer,
                      measure_costs=self.spec.balance and self.fixed_costs is None)
      return forward(ops, plan, *args)
    fn = self._jits.get(plan)
    if fn is None:
      fn = self._jits[plan] = fused_forward(plan, self.config.hidden_act, self._layer_defs, self.edges[0],
                                            donate_buffers=self.spec.cache)
    return fn(self._layer_leaves, self.edges[1], *args)

  def _record_layers(self, plan: StepPlan, records, vflat, n_tokens, run, layer_times) -> None:
    """Counters, copies and the trace event of every layer of a finished step."""
    host = np.asarray(records.host)
    experts = records.experts
    c = len(COUNTERS)
    moe_at = {l: j for j, l in enumerate(self.config.moe_layer_ids)}
    for seg_i, seg in enumerate(plan.segments):
      for l in seg.dense:
        run.add_layer_event(LayerEvent(layer=l, tokens=n_tokens, dense_bytes=self.dense_bytes[l], expert_bytes=0,
                                       measured=dict(layer_times.get(l, {}))), bytes_to_device=0, counts={})
      l = seg.next
      if l is None:
        break
      j = moe_at[l]
      sel = None if experts[j] is None else np.asarray(experts[j])[vflat]
      if self.record_routing:
        run.record_routing(l, sel)
      common = {"layer": l, "tokens": n_tokens, "dense_bytes": self.dense_bytes[l],
                "expert_bytes": self.expert_bytes[l], "measured": dict(layer_times.get(l, {}))}
      if plan.exact:  # every expert streamed in, the model's own routing computed on the device
        e = self.config.num_experts if self.spec.cache else 0
        used = len(np.unique(sel))
        run.add_layer_event(LayerEvent(**common, hits=used, layerwise_loads=e, gpu_pairs=sel.size, cpu_pairs=0),
                            bytes_to_device=e * self.expert_bytes[l],
                            counts={"pairs": sel.size, "pairs_hit": sel.size, "hits": used, "gpu_pairs": sel.size})
        continue
      counts = dict(zip(COUNTERS, host[j, :c].tolist()))
      n_loads, n_prefetch = int(host[j, c]), int(host[j, c + 1])
      run.add_prefetch_bytes(l, n_prefetch * self.expert_bytes[l])
      # The paper's predictor for the following MoE layer runs during this one and reads that layer's weights.
      following = plan.segments[seg_i + 1]
      predictor_bytes = self.dense_bytes[following.next] if following.prefetch == "provisional" else 0
      run.add_layer_event(
          LayerEvent(
              **common, hits=counts["hits"], demand_loads=counts["demand_loads"], prefetch_loads=counts["prefetched"],
              prefetch_used=counts["prefetch_used"], cpu_experts=counts["cpu_experts"],
              substituted=counts["substituted"], gpu_pairs=counts["gpu_pairs"], cpu_pairs=counts["cpu_pairs"],
              predictor_bytes=predictor_bytes,
          ),
          bytes_to_device=n_loads * self.expert_bytes[l],
          counts=counts,
      )

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
    """One forward step of T tokens per sequence, recorded into `run`.

    Args:
      ids: `[B, T]` int32 (numpy or device); positions: `[B, T]` rotary
        positions; valid: `[B, T]` numpy bool (False: padding); index: cache row
        of the first token; caches: per layer KV cache (the list's entries are
        replaced by the step's outputs).

    Returns last-position logits `[B, V]`, or with `score` the next-token
    log-probabilities and argmax flags of the step's own tokens (`[B, T-1]` each).
    """
    exact = (kind == "prefill" and not self.policy_in_prefill) or self.spec.layerwise
    self._measure_costs_once(exact)
    t0 = time.perf_counter()
    plan = self._step_plan(exact, score)
    vflat = valid.reshape(-1)
    inputs = _attention_inputs(self.config, positions, jnp.asarray(valid), index)
    layer_times = {}
    out, kvs, self.states, buffers, self.costs, records = self._forward(plan, ids, inputs, jnp.asarray(vflat),
                                                                        list(caches), layer_times)
    caches[:] = kvs
    if buffers is not None:
      self.buffers = buffers
    records = jax.device_get(records)
    out = jax.block_until_ready(out)
    n_tokens = int(vflat.sum())
    run.begin_step(kind, tokens=n_tokens)
    self._record_layers(plan, records, vflat, n_tokens, run, layer_times)
    for name, seconds in layer_times.get(None, {}).items():
      run.add_time(name, seconds)
    run.end_step(time.perf_counter() - t0, head_bytes=self.head_bytes)
    return out

  def _decode_on_device(self, logits, key, forced, feed, positions, index, n, caches, run, temperature, top_p):
    """Emits n >= 2 tokens from the prompt's logits `[B, V]` with the n - 1 decode steps between them in one
    program (`stages.fused_decode`), then records every step from the counters it returns.

    forced: `[B, n]` or None; feed: `[B, n]` bool (step i's token is real);
    positions `[B, 1]` / index: of the first decode step. The steps' wall times
    are the program's run time (compilation excluded) shared evenly.
    Returns (tokens, logp, greedy), each `[B, n]`.
    """
    exact = self.spec.layerwise
    self._measure_costs_once(exact)
    plan = self._step_plan(exact, score=False)
    length = bucket(n)
    pad = lambda a: None if a is None else np.pad(a, ((0, 0), (0, length - n)))
    args = (self._layer_leaves, self.edges[1], logits, key, pad(forced), pad(feed), positions, jnp.int32(index),
            jnp.int32(n), list(caches), self.states, self.buffers, self._store, self.costs, self.alpha, self._sims,
            self.prior_strength)
    signature = ("decode", plan, length, temperature, top_p, forced is None, logits.shape, caches[0].k.shape)
    compiled = self._jits.get(signature)
    if compiled is None:  # compiled ahead of the timed run
      fn = fused_decode(plan, self.config.hidden_act, self._layer_defs, self.edges[0], self.spec.cache,
                        length=length, temperature=temperature, top_p=top_p)
      compiled = self._jits[signature] = fn.lower(*args).compile()
    t0 = time.perf_counter()
    out = compiled(*args)
    tokens, logp, greedy, steps = jax.device_get((out.tokens, out.logp, out.greedy, out.records))
    per_step = (time.perf_counter() - t0) / (n - 1)
    caches[:] = out.kvs
    self.states, self.costs = out.states, out.costs
    if out.buffers is not None:
      self.buffers = out.buffers
    for i in range(n - 1):
      valid = feed[:, i]
      run.begin_step("decode", tokens=int(valid.sum()))
      records = Records(steps.host[i], [None if e is None else e[i] for e in steps.experts])
      self._record_layers(plan, records, valid, int(valid.sum()), run, {})
      run.end_step(per_step, head_bytes=self.head_bytes)
    return tuple(np.ascontiguousarray(a[:n].T) for a in (tokens, logp, greedy))

  def new_run_stats(self) -> RunStats:
    """An empty `RunStats` for this engine, to accumulate several calls (`run_stats=`) into."""
    return RunStats(self.config, dtype_bytes=jnp.dtype(self.model.dtype).itemsize)

  def _prompt(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids `[B, T]` int32, valid `[B, T]` bool, rotary positions `[B, T]`) of a left-padded batch, on the host."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, tokens], got shape {ids.shape}.")
    valid = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    return ids, valid, np.asarray(prompt_positions(jnp.asarray(valid)))

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
    self._maybe_calibrate_static(ids, valid, positions)
    run = self.new_run_stats() if run_stats is None else run_stats
    caches = self.model.init_caches(*ids.shape)
    logp, greedy = self._step(ids, positions, valid, 0, caches, run, "prefill", score=True)
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
    self._maybe_calibrate_static(ids, valid, positions)
    run = self.new_run_stats() if run_stats is None else run_stats
    if cache_length is not None and cache_length < t + max_new_tokens:
      raise ValueError(f"cache_length={cache_length} is below prompt + new tokens = {t + max_new_tokens}.")
    # Bucketed cache length: calls of many sizes share the decode compilations.
    caches = self.model.init_caches(b, cache_length or bucket(t + max_new_tokens))
    key = jax.random.PRNGKey(seed)
    logits = self._step(ids, positions, valid, 0, caches, run, "prefill")
    if max_new_tokens >= 2 and stop is None and not self.profile:  # the whole decode as one program
      gen, logps, greedy = self._decode_on_device(logits, key, forced_tokens, feed, positions[:, -1:] + 1, t,
                                                  max_new_tokens, caches, run, temperature, top_p)
      return GenerationResult(tokens=np.concatenate([ids, gen.astype(np.int32)], axis=1), logprobs=logps,
                              greedy=greedy, stats=run.summary(), trace=run.trace, routing=run.routing)
    # The host drives the steps: a stop callback sees each token, or profile mode times each stage.
    out, logps, greedy = [], [], []
    for step in range(max_new_tokens):
      forced = None if forced_tokens is None else forced_tokens[:, step]
      token, logp, is_greedy, key = _emit(logits, key, forced, temperature=temperature, top_p=top_p)
      # np.array copies: a zero-copy view would keep each step's device buffers alive.
      for acc, a in zip((out, logps, greedy), (token, logp, is_greedy)):
        acc.append(np.array(a))
      if step == max_new_tokens - 1 or (stop is not None and stop(np.stack(out, 1))):
        break
      logits = self._step(token[:, None], positions[:, -1:] + 1 + step, feed[:, step, None], t + step, caches, run,
                          "decode")
    gen = np.stack(out, 1) if out else np.zeros((b, 0), np.int32)
    return GenerationResult(
        tokens=np.concatenate([ids, gen.astype(np.int32)], axis=1),
        logprobs=np.stack(logps, 1) if logps else np.zeros((b, 0), np.float32),
        greedy=np.stack(greedy, 1) if greedy else np.zeros((b, 0), bool),
        stats=run.summary(),
        trace=run.trace,
        routing=run.routing,
    )
