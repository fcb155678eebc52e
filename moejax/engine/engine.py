"""The decode engine: runs a model with its routed experts in host memory under a scheduling policy.

Each forward step is one jitted program (`moejax.engine.stages.forward`,
`DecodeState -> DecodeState`): layer by layer, the policy plans each MoE layer
from its router scores (substitution, copies with eviction, CPU work), the
layer's device slots are filled from the `pinned_host` expert store inside
the program, pairs left off the device run on the host
(`compute_on("device_host")`), and the experts are read from the slots. The
host dispatches one call per step and reads back its counters. `generate`
runs the whole decode (sampling included) as one program, a scan of that
step, and reads every step's counters once at the end; with a `stop`
callback, or `profile=True` (the same step stage by stage, blocked on and
timed per layer), the host drives step by step.

With alpha = 0 every policy computes exactly the model's own experts, so the
tokens equal the resident model's (tested for every policy and budget).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import validation
from moejax.engine import costs as costs_lib
from moejax.engine import sampling, setup
from moejax.engine.stages import (
  DecodeConfig,
  DecodeInput,
  StagedOps,
  StepRecord,
  decode_program,
  forward,
  step_program,
)
from moejax.engine.state import DecodeState, Residency, StepConfig, StepConstants, StepInput
from moejax.engine.stats import LayerCounters, LayerRouting, RunStats, StepSummary
from moejax.models.model import Model, bucket
from moejax.offload.store import HostExpertStore
from moejax.scheduling import balance
from moejax.scheduling.cache import CacheState
from moejax.scheduling.policies import PolicySpec, get_policy
from moejax.sim.trace import StepTrace


@dataclasses.dataclass(frozen=True)
class EngineOptions:
  """How an `Engine` schedules experts (pass the fields to `Engine` as keywords).

  Attributes:
    policy: a registered policy name (`moejax.scheduling.POLICIES`) or a `PolicySpec`.
    alpha: substitution threshold (>= 0); 0 computes the model exactly.
      None: the policy's own (`PolicySpec.alpha`, e.g. 0.25 for
      smoe_release), else 0.
    cache_slots / cache_bytes / cache_fraction: the device expert cache, as
      slots, a total byte budget, or a fraction of the experts (at most one;
      default: every expert), per MoE layer or for the shared pool.
    cache_scope: "layer" (slots per MoE layer) or "global" (one pool of slots
      shared by every MoE layer; eviction chooses among all of them); None:
      the policy's own (`PolicySpec.cache_scope`).
    window: score-history steps for score-based eviction.
    similarity: `[L, E, E]` (or `[E, E]` for every layer) similarity for the
      "similarity" and "buddy" substitutions; default router-weight cosine.
    substitute_weight: "own" or "replaced" (see `scheduling.route`).
    cache_prior_strength: log-score bias toward resident experts for the
      cache_prior policy; default log(1 + alpha), so alpha = 0 is exact.
    costs: per-expert copy and CPU costs of the balance split (smoe, mrs):
      "calibrate" (measured once on this machine), a hardware profile name,
      or fixed seconds "LOAD_S,CPU_S" / (load_s, cpu_s); see
      `moejax.engine.costs`. Fixed costs make runs repeatable.
    policy_in_prefill: schedule the prompt's tokens too (default: the prompt
      is computed exactly with every expert streamed in, and warms the cache).
    static_experts: `[L][S]` resident sets for the static policy (default:
      the most used experts of the first prompt).
    profile: run each step stage by stage, blocked on and timed per layer
      (attention, plan, prefetch, copy, cpu, experts, head); slower.
    record_routing: keep the experts computed per token, layer and step in
      `GenerationResult.routing` (for the oracle bounds, co-activation similarity and tests).
  """

  policy: str | PolicySpec = "smoe"
  alpha: float | None = None
  cache_slots: int | None = None
  cache_bytes: int | None = None
  cache_fraction: float | None = None
  cache_scope: str | None = None
  window: int = 8
  similarity: Any = None
  substitute_weight: str = "own"
  cache_prior_strength: float | None = None
  costs: Any = costs_lib.CALIBRATE
  policy_in_prefill: bool = False
  static_experts: Sequence[Sequence[int]] | None = None
  profile: bool = False
  record_routing: bool = False


@dataclasses.dataclass
class GenerationResult:
  """Output of `Engine.generate`.

  tokens: `[B, T + N]` prompt and generated (or forced) tokens.
  logprobs: `[B, N]` log-probability of each emitted token under the model.
  greedy: `[B, N]` bool, whether each emitted token was the argmax.
  stats: run statistics (see `moejax.engine.stats.RunStats.summary`).
  trace: per-step `StepTrace` records for the TPOT estimator.
  routing: with `record_routing`, per step {MoE layer: `LayerRouting`} of the
    valid tokens (experts computed after substitution, top-score flags); else empty.
  """

  tokens: np.ndarray
  logprobs: np.ndarray
  greedy: np.ndarray
  stats: dict[str, Any]
  trace: list[StepTrace]
  routing: list[dict[int, LayerRouting]]


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How `Engine.generate` decodes (pass the fields to `generate` as keywords).

  Attributes:
    forced_tokens: optional `[B, N]` tokens to feed instead of sampling
      (teacher forcing: scoring sees exactly the decode path).
    forced_mask: optional `[B, N]`, 0 where `forced_tokens` is padding (right
      padding of shorter continuations). A decode step feeds token n of a row
      as padding (ignored by scheduling, the cache and the stats) unless token
      n + 1 is real, so each row runs exactly the steps its own continuation
      needs; logprobs at padded positions are meaningless.
    temperature: 0 for greedy; else sampling with `top_p` and `seed`.
    top_p: nucleus sampling mass, in (0, 1].
    seed: of the sampling key.
    stop: optional `stop(tokens [B, n]) -> bool` called on the tokens emitted
      so far; returning True ends decoding early (fewer than N). The host then
      drives the steps.
    run_stats: a `RunStats` to accumulate into across calls (default: a fresh
      one); `stats`, `trace` and `routing` then cover every call.
    cache_length: KV cache rows, >= T + N (default: T + N rounded up to a
      power of two). Calls with different T + N but one cache_length share the
      decode compilations.
    forward_only: decode steps skip the LM head and sampling (the released
      code's TPOT times the decoder's forward alone); needs `forced_tokens`,
      and the log-probs are then meaningless.
  """

  forced_tokens: Any = None
  forced_mask: Any = None
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  stop: Callable[[np.ndarray], bool] | None = None
  run_stats: RunStats | None = None
  cache_length: int | None = None
  forward_only: bool = False


def _with_overrides(options, overrides: dict, what: str):
  """`options` (a frozen dataclass) with the fields in `overrides` replaced; unknown names raise TypeError."""
  known = {f.name for f in dataclasses.fields(options)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise TypeError(f"{what} got unknown option(s) {unknown}; the options are {sorted(known)}.")
  return dataclasses.replace(options, **overrides)


_emit = jax.jit(sampling.emit, static_argnames=("temperature", "top_p"))
_prng_key = jax.jit(jax.random.PRNGKey)


class Engine:
  """Offloaded MoE decoding under a named scheduling policy.

  `Engine(model, policy="smoe", alpha=0.3, cache_fraction=0.25)`: the keywords
  are the fields of `EngineOptions` (or pass an `EngineOptions`). Load the
  model with `experts="host"` so routed experts never all sit on the device
  (`Engine.from_pretrained` does this).
  """

  def __init__(self, model: Model, options: EngineOptions | None = None, **overrides):
    opts = _with_overrides(options or EngineOptions(), overrides, "Engine")
    config = model.config
    if not config.moe_layer_ids:
      raise ValueError(f"The model ({config.model_type}) has no MoE layers; there is nothing to schedule.")
    spec = opts.policy if isinstance(opts.policy, PolicySpec) else get_policy(opts.policy)
    # Unset options take the policy's own alpha and scope.
    opts = dataclasses.replace(
      opts,
      alpha=float(spec.alpha or 0.0 if opts.alpha is None else opts.alpha),
      cache_scope=opts.cache_scope or spec.cache_scope,
    )
    alpha = opts.alpha
    if not alpha >= 0:
      raise ValueError(f"alpha must be >= 0 (got {alpha}); alpha = 0 computes the model exactly.")
    self.model, self.config, self.options, self.spec = model, config, opts, spec
    dtype_bytes = jnp.dtype(model.dtype).itemsize
    self.num_slots = setup.slot_count(
      config,
      spec,
      cache_slots=opts.cache_slots,
      cache_bytes=opts.cache_bytes,
      cache_fraction=opts.cache_fraction,
      scope=opts.cache_scope,
      dtype_bytes=dtype_bytes,
    )
    self.placements = setup.placements(config, spec, self.num_slots, opts.cache_scope)
    experts = model.experts_on_device() if not spec.cache else HostExpertStore(model.experts).layers
    self.consts = StepConstants(
      params=jax.tree.leaves(nnx.state(model.decoder)),
      experts=tuple(experts),
      similarity=setup.similarity_per_layer(model, spec, opts.similarity),
      alpha=jnp.float32(alpha),
      prior_strength=jnp.float32(np.log1p(alpha) if opts.cache_prior_strength is None else opts.cache_prior_strength),
      costs=balance.init_cost_model(),
    )
    self._graphdef = nnx.graphdef(model.decoder)
    self._empty_kv = jax.jit(model.init_caches, static_argnums=(0, 1))  # [B, max_len] caches made on the device
    self.facts = setup.layer_facts(model, spec, self.placements)
    # The programs see the components only, so policies with equal components share compilations; a policy that
    # forces the top-k weights to sum to one computes with a config that says so.
    self._spec_key = dataclasses.replace(spec, name="", alpha=None)
    self._step_model = dataclasses.replace(config, norm_topk_prob=True) if spec.renormalize else config
    self._programs: dict[Any, Callable] = {}  # this engine's compiled programs, freed with it
    self.fixed_costs = costs_lib.resolve_costs(opts.costs, config)
    self.calibrated_costs: balance.CostModel | None = self.fixed_costs  # "calibrate": set before the first plan
    if self.fixed_costs is not None:
      self.consts = self.consts._replace(costs=self.fixed_costs)
    self.reset()

  @classmethod
  def from_pretrained(cls, path, *, dtype=None, **options) -> Engine:
    """Loads a checkpoint with routed experts in host memory (in its own dtype unless `dtype` says otherwise) and
    builds an Engine (keywords: `EngineOptions`)."""
    from moejax.checkpoints.loader import load

    return cls(load(path, dtype=dtype, experts="host"), **options)

  # --------------------------------------------------------------------------
  # State
  # --------------------------------------------------------------------------

  def reset(self, static_experts: dict[int, Sequence[int]] | None = None) -> None:
    """Empties the expert cache (or fills it as the policy starts: the static sets, the layer-order fill) and
    forgets the score history."""
    config = self.config
    if static_experts is None and self.options.static_experts is not None:
      static_experts = dict(zip(config.moe_layer_ids, self.options.static_experts))
    if self.spec.static and static_experts is not None:
      initial = {l: list(x)[: self.num_slots] for l, x in static_experts.items()}
    elif self.spec.fill == "layer_order":
      initial = setup.layer_order_fill(config, self.num_slots, self.options.cache_scope)
    else:
      initial = None
    self.static_ready = not self.spec.static or static_experts is not None
    pools = setup.initial_pools(
      config,
      self.placements,
      self.num_slots,
      window=self.options.window,
      dtype=self.model.dtype,
      store=self.consts.experts,
      initial=initial,
    )
    self.state = DecodeState(kv=(), pools=pools)

  @property
  def costs(self) -> balance.CostModel:
    """The per-expert load / CPU costs the balance split uses."""
    return self.consts.costs

  @property
  def states(self) -> dict[int, CacheState]:
    """Per MoE layer, the bookkeeping of the slots it uses (shared by all layers with cache_scope "global")."""
    return {
      l: self.state.pools[p.pool].table
      for l, p in enumerate(self.placements)
      if p is not None and p.residency == Residency.CACHED
    }

  def calibrate_costs(self, repeats: int = 5) -> balance.CostModel:
    """Measures this machine's per-expert copy and CPU costs on the first MoE layer (`costs.calibrate`)."""
    return costs_lib.calibrate(self.config, self.consts.experts[self.config.moe_layer_ids[0]], repeats)

  def _calibrate_once(self, scheduled: bool) -> None:
    """Before a call that schedules steps, for a policy that splits misses by costs="calibrate": measure (once)."""
    if scheduled and self.spec.split_costs and self.calibrated_costs is None:
      self.calibrated_costs = self.calibrate_costs()
      self.consts = self.consts._replace(costs=self.calibrated_costs)

  def new_run_stats(self) -> RunStats:
    """An empty `RunStats` for this engine, to accumulate several calls (`run_stats=`) into."""
    return RunStats(self.config, self.facts, dtype_bytes=jnp.dtype(self.model.dtype).itemsize)

  # --------------------------------------------------------------------------
  # Steps
  # --------------------------------------------------------------------------

  def _step_config(
    self, exact: bool, score: bool = False, routing: bool | None = None, head: bool = True
  ) -> StepConfig:
    return StepConfig(
      self._step_model,
      self._spec_key,
      self.options.substitute_weight,
      self.placements,
      exact=exact,
      warm=exact and not self.spec.static,
      score=score,
      routing=self.options.record_routing if routing is None else routing,
      head=head,
    )

  def _record(self, run: RunStats, step: StepSummary, record: StepRecord, valid: np.ndarray, measured=None) -> None:
    """Adds one finished step (host arrays in `record`; valid `[N]` its real tokens) to `run`."""
    routing = None
    if record.routing is not None:
      routing = {
        l: LayerRouting(np.asarray(e)[valid], np.asarray(t)[valid])
        for l, (e, t) in zip(self.config.moe_layer_ids, record.routing)
      }
    run.record_step(step, LayerCounters(*(np.asarray(c) for c in record.counters)), routing, measured)

  def _prefill_config(self, score: bool = False, routing: bool | None = None) -> StepConfig:
    """A prompt's step: exact (every expert streamed in, warming the cache) unless `policy_in_prefill`."""
    return self._step_config(not self.options.policy_in_prefill or self.spec.layerwise, score, routing)

  def _step(
    self, state: DecodeState, batch: StepInput, cfg: StepConfig, kind: str, run: RunStats
  ) -> tuple[Any, DecodeState]:
    """One forward step of `batch` (host arrays) as a `kind` step, recorded into `run`; returns (output, state)."""
    t0 = time.perf_counter()
    batch = jax.device_put(batch)
    measured: dict = {}
    if self.options.profile:

      def timer(layer, name, seconds):
        stages = measured.setdefault(layer, {})
        stages[name] = stages.get(name, 0.0) + seconds

      out, state, record = forward(StagedOps(self.model.decoder, self._programs, timer), cfg, self.consts, state, batch)
    else:
      if cfg not in self._programs:
        self._programs[cfg] = step_program(cfg, self._graphdef)
      out, state, record = self._programs[cfg](self.consts, state, batch)
    out, record = jax.device_get((out, record))
    valid = np.asarray(jax.device_get(batch.valid)).reshape(-1)
    self._record(
      run, StepSummary(kind, int(valid.sum()), time.perf_counter() - t0, not cfg.exact), record, valid, measured
    )
    return out, state

  def _decode_on_device(
    self, state: DecodeState, start: DecodeInput, cfg: DecodeConfig, run: RunStats
  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, DecodeState]:
    """Emits n >= 2 tokens from the prompt's logits with the n - 1 decode steps between them as one program
    (`stages.decode`), then records every step from the records it returns.

    The steps' wall times are the program's run time (compilation excluded)
    shared evenly. Returns (tokens, logp, greedy), each `[B, n]`, and the state.
    """
    start = jax.device_put(start)
    signature = ("decode", cfg, jax.tree.map(lambda a: (a.shape, a.dtype), (start, state)))
    if signature not in self._programs:  # compiled ahead of the timed run
      self._programs[signature] = decode_program(cfg, self._graphdef).lower(self.consts, state, start).compile()
    t0 = time.perf_counter()
    out = self._programs[signature](self.consts, state, start)
    tokens, logp, greedy, records = jax.device_get((out.tokens, out.logp, out.greedy, out.records))
    n = int(jax.device_get(start.n))
    per_step = (time.perf_counter() - t0) / (n - 1)
    feed = np.asarray(jax.device_get(start.feed))
    for i in range(n - 1):
      valid = feed[:, i]
      self._record(
        run,
        StepSummary("decode", int(valid.sum()), per_step, not cfg.step.exact),
        jax.tree.map(lambda a: a[i], records),
        valid,
      )
    return *(np.ascontiguousarray(a[:n].T) for a in (tokens, logp, greedy)), out.state

  def _decode_on_host(
    self,
    state: DecodeState,
    start: DecodeInput,
    cfg: DecodeConfig,
    run: RunStats,
    stop: Callable[[np.ndarray], bool] | None,
  ):
    """The same decode driven from the host, one `_step` per token (stop callbacks, profile mode).

    Returns (tokens, logp, greedy), each `[B, n]` (n <= `start.n` when `stop` ends early), and the state.
    """
    logits, key = start.logits, _prng_key(jax.device_put(start.seed))
    emitted = []
    for i in range(int(start.n)):
      forced = None if start.forced is None else start.forced[:, i]
      token, logp, greedy, key = jax.device_get(
        _emit(logits, key, forced, temperature=cfg.temperature, top_p=cfg.top_p)
      )
      emitted.append((token, logp, greedy))
      if i == start.n - 1 or (stop is not None and stop(np.stack([e[0] for e in emitted], 1))):
        break
      batch = StepInput(token[:, None], start.positions + i, start.feed[:, i, None], np.int32(start.index + i))
      logits, state = self._step(state, batch, cfg.step, "decode", run)
    if not emitted:
      b = start.logits.shape[0]
      return np.zeros((b, 0), np.int32), np.zeros((b, 0), np.float32), np.zeros((b, 0), bool), state
    tokens, logps, greedy = (np.stack(a, 1) for a in zip(*emitted))
    return tokens, logps, greedy, state

  def _resident(self, state: DecodeState):
    """What the slots of `state` hold: {MoE layer: experts} per layer, or the keys of a shared pool."""
    tables = jax.device_get([pool.table.slot_expert for pool in state.pools])
    if self.options.cache_scope == "global":
      return sorted(int(k) for k in tables[0] if k >= 0) if tables else []
    return {
      l: sorted(int(e) for e in tables[p.pool] if e >= 0)
      for l, p in enumerate(self.placements)
      if p is not None and p.residency == Residency.CACHED
    }

  # --------------------------------------------------------------------------
  # Static placement
  # --------------------------------------------------------------------------

  def _maybe_calibrate_static(self, batch: StepInput) -> None:
    """Static policy without given sets: keep the most used experts of this prompt (one exact step)."""
    if self.static_ready:
      return
    run = self.new_run_stats()
    self._step(
      self.state._replace(kv=self._empty_kv(*batch.ids.shape)),
      batch,
      self._prefill_config(routing=True),
      "prefill",
      run,
    )
    counts = {l: np.bincount(r.experts.ravel(), minlength=self.config.num_experts) for l, r in run.routing[0].items()}
    self.reset(setup.most_used(counts, self.num_slots, self.options.cache_scope))

  # --------------------------------------------------------------------------
  # Public API
  # --------------------------------------------------------------------------

  def _prompt(self, input_ids, attention_mask, right_padding: bool = False) -> StepInput:
    """The prefill `StepInput` of a padded batch, checked (`moejax.validation.prompt_batch`), on the host."""
    ids, valid = validation.prompt_batch(
      input_ids, attention_mask, vocab_size=self.config.vocab_size, right_padding=right_padding
    )
    positions = np.maximum(np.cumsum(valid, axis=1, dtype=np.int32) - 1, 0)  # as `models.model.prompt_positions`
    return StepInput(ids, positions, valid, np.int32(0))

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
    batch = self._prompt(input_ids, attention_mask, right_padding=True)
    self._maybe_calibrate_static(batch)
    self._calibrate_once(self.options.policy_in_prefill)
    run = self.new_run_stats() if run_stats is None else run_stats
    (logp, greedy), state = self._step(
      self.state._replace(kv=self._empty_kv(*batch.ids.shape)), batch, self._prefill_config(score=True), "prefill", run
    )
    self.state = state._replace(kv=())
    return np.asarray(logp), np.asarray(greedy)

  def generate(
    self, input_ids, max_new_tokens: int, attention_mask=None, decoding: Decoding | None = None, **overrides
  ) -> GenerationResult:
    """Decodes N tokens for a batch of B left-padded prompts.

    Args:
      input_ids: `[B, T]` prompts (left padded where attention_mask is 0).
      max_new_tokens: N.
      attention_mask: `[B, T]` 1 for real tokens.
      decoding / overrides: how to decode, a `Decoding` and / or its fields
        as keywords (`forced_tokens`, `forced_mask`, `temperature`, `top_p`,
        `seed`, `stop`, `run_stats`, `cache_length`).

    Returns:
      A `GenerationResult`.
    """
    opts = _with_overrides(decoding or Decoding(), overrides, "generate")
    forced_tokens, forced_mask, stop, cache_length = opts.forced_tokens, opts.forced_mask, opts.stop, opts.cache_length
    batch = self._prompt(input_ids, attention_mask)
    b, t = batch.ids.shape
    max_new_tokens, temperature, top_p = validation.generation_options(max_new_tokens, opts.temperature, opts.top_p)
    forced_tokens, forced_mask = validation.forced_batch(
      forced_tokens, forced_mask, batch=b, max_new_tokens=max_new_tokens, vocab_size=self.config.vocab_size
    )
    feed = np.ones((b, max_new_tokens), bool)
    if forced_mask is not None:
      feed[:, :-1] = forced_mask[:, 1:]
    if cache_length is not None and cache_length < t + max_new_tokens:
      raise ValueError(f"cache_length={cache_length} is below prompt + new tokens = {t + max_new_tokens}.")
    self._maybe_calibrate_static(batch)
    self._calibrate_once(not self.spec.layerwise and (max_new_tokens > 1 or self.options.policy_in_prefill))
    run = self.new_run_stats() if opts.run_stats is None else opts.run_stats
    # Bucketed cache length: calls of many sizes share the decode compilations.
    state = self.state._replace(kv=self._empty_kv(b, cache_length or bucket(t + max_new_tokens)))
    logits, state = self._step(state, batch, self._prefill_config(), "prefill", run)
    if self.options.record_routing and max_new_tokens > 1:
      run.record_decode_start(self._resident(state))
    start = DecodeInput(
      logits,
      np.uint32(validation.count(opts.seed, name="seed")),
      forced_tokens,
      feed,
      batch.positions[:, -1:] + 1,
      np.int32(t),
      np.int32(max_new_tokens),
    )
    if opts.forward_only and forced_tokens is None:
      raise ValueError("forward_only=True times the decoder without its LM head, so it needs forced_tokens.")
    step = self._step_config(self.spec.layerwise, head=not opts.forward_only)
    if max_new_tokens >= 2 and stop is None and not self.options.profile:  # the whole decode as one program
      length = bucket(max_new_tokens)
      pad = lambda a: None if a is None else np.pad(a, ((0, 0), (0, length - max_new_tokens)))
      start = start._replace(forced=pad(forced_tokens), feed=pad(feed))
      gen, logps, greedy, state = self._decode_on_device(
        state, start, DecodeConfig(step, length, temperature, top_p), run
      )
    else:  # the host drives the steps: a stop callback sees each token, or profile mode times each stage
      cfg = DecodeConfig(step, max_new_tokens, temperature, top_p)
      gen, logps, greedy, state = self._decode_on_host(state, start, cfg, run, stop)
    self.state = state._replace(kv=())
    return GenerationResult(
      tokens=np.concatenate([batch.ids, gen.astype(np.int32)], axis=1),
      logprobs=logps,
      greedy=greedy,
      stats=run.summary(),
      trace=run.trace,
      routing=run.routing,
    )
