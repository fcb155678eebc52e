"""The engine's forward step, written once, and the two ways to run its stages.

A step runs the decoder layer by layer. At each MoE layer the policy's
scheduling decision (substitution, copies with eviction, CPU work) is made
from the router scores, the layer's device slots are filled from the host
store, pairs left off the device run on the host, and the layer's experts are
then read from its slots. `forward` holds this data flow once; every stage is
a plain function of the decoder layer (or of no module), run through a
`StepOps`:

- `InlineOps` (the default): the whole step, or the whole decode, is one
  jitted program (`step_program`, `decode_program`); each stage is traced in
  place under `jax.named_scope(stage)`, so a profile of the program shows
  attention / plan / prefetch / copy / cpu / experts / head. Copies happen
  inside it: each expert is sliced from the `pinned_host` store, moved to
  device memory and written into its slot (`moejax.offload.slots.fill_slots`);
  CPU pairs run under `compute_on("device_host")` (`moejax.offload.cpu`).
- `StagedOps` (`Engine(profile=True)`): every stage its own jitted call,
  blocked on and timed per layer by stage name.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.engine import sampling
from moejax.engine.schedule import (
  Knobs,
  LayerDecision,
  LayerPlan,
  PrefetchGate,
  prefetch_layer,
  schedule_exact,
  schedule_layer,
)
from moejax.engine.state import DecodeState, Residency, SlotPool, StepConfig, StepConstants, StepInput
from moejax.engine.stats import LayerCounters
from moejax.models import moe
from moejax.models.compile import compiler_options
from moejax.models.layers import attention_inputs
from moejax.offload.cpu import host_experts
from moejax.offload.slots import fill_slots
from moejax.scheduling import cache


class StepRecord(NamedTuple):
  """What a step reports besides its output: `LayerCounters` of `[L_moe]` arrays (MoE layers in order) and,
  with `StepConfig.routing`, per MoE layer (experts `[N, k]`, top `[N, k]`) of every pair (else None)."""

  counters: LayerCounters
  routing: tuple[tuple[jax.Array, jax.Array], ...] | None


# ----------------------------------------------------------------------------
# Stages: plain functions of a decoder layer (or the decoder, or no module).
# ----------------------------------------------------------------------------


def embed(decoder, ids):
  """ids `[B, T]` -> hidden states `[B, T, D]`."""
  return decoder.embed(ids)


def attend_dense(layer, h, inputs, kv):
  """A dense layer: attention then its MLP; h `[B, T, D]`."""
  h, kv = layer.attend(h, inputs, kv)
  return layer.dense_ffn(h), kv


def attend_route(layer, h, inputs, kv):
  """An MoE layer up to its router: (h after attention `[B, T, D]`, MoE input x `[N, D]`, scores `[N, E]`, kv)."""
  h, kv = layer.attend(h, inputs, kv)
  x = layer.ffn_input(h)
  return h, x, layer.router_scores(x), kv


def peek_scores(layer, h, inputs, kv):
  """The paper's predictor: the layer's attention (KV write discarded) and gate on hidden states h `[B, T, D]`."""
  h, _ = layer.attend(h, inputs, kv)
  return layer.router_scores(layer.ffn_input(h))


def gate_scores(layer, x):
  """The cheap predictor: the layer's gate applied to another layer's MoE input x `[N, D]`."""
  return layer.router_scores(x)


def layernorm_scores(residual: bool, prev_layer, layer, x, h):
  """The released code's predictor of `layer`'s scores `[N, E]` from the previous MoE layer's MoE input x `[N, D]`.

  No attention and no routed experts: u = x + shared(x) (+ h, the previous
  layer's residual stream after its attention, `[B, T, D]`, with `residual`),
  then `layer`'s input norm as a skipped attention (norm(u) + u), its
  post-attention norm and its gate (docs/smoe_release.md, 4.1).
  """
  u = x + prev_layer.mlp.shared_output(x)
  if residual:
    u = u + h.reshape(x.shape)
  v = layer.input_layernorm(u) + u
  return layer.router_scores(layer.post_attention_layernorm(v))


def stream(store):
  """Every expert of a layer `[E, ...]` copied to device memory (slot = expert id)."""
  return jax.device_put(store, jax.memory.Space.Device)


def warm(policy: str, group: int, table, scores, valid, selected, weights, streamed):
  """After an exact layer: admits the experts its tokens used (`selected` `[N, k]`), most important first, into
  the layer's slots, copying them from `streamed` (already on the device: nothing more crosses the host link)."""
  e = scores.shape[-1]
  used = jnp.zeros(e, bool).at[selected].max(jnp.broadcast_to(valid[:, None], selected.shape))
  priority = jnp.max(jnp.where(valid[:, None], scores, 0.0), axis=0)
  table, adm = cache.admit(
    table, used, jnp.zeros(e, bool), priority, policy=policy, max_loads=min(table.num_slots, e), group=group
  )
  return cache.observe(table, scores, used, valid, group=group), fill_slots(weights, streamed, adm.experts, adm.slots)


def experts(act: str, provisional: bool, layer, h, x, weights, d: LayerDecision, extra):
  """Routed experts read from slot weights + shared experts + residual; h `[B, T, D]`, x `[N, D]`.

  Returns (provisional, h). With `provisional`, the provisional output holds
  the shared experts and the device pairs whose expert was resident before the
  plan (not `d.demand`), and h adds the demand-loaded pairs after it; else the
  two are one pass. h adds `extra` `[N, D]` float32 (the CPU experts; None:
  nothing).
  """
  slots, mix = d.slots, d.mix
  routed = moe.routed_experts(x, weights, jnp.where(d.demand, -1, slots) if provisional else slots, mix, act)
  prov = layer.finish_moe(h, x, routed)
  rest = [moe.routed_experts(x, weights, jnp.where(d.demand, slots, -1), mix, act)] if provisional else []
  rest += [] if extra is None else [extra]
  if not rest:
    return prov, prov
  return prov, layer.finish_moe(
    h, x, sum((r.astype(jnp.float32) for r in rest), routed.astype(jnp.float32)).astype(x.dtype)
  )


def cpu_experts(act: str, x, store, d: LayerDecision):
  """The pairs of `d` marked `on_cpu`, computed on the host from the store: `[N, D]` float32."""
  return host_experts(x, store, d.experts, d.mix, d.on_cpu, act)


def head(score: bool, decoder, h, ids):
  """Last-position logits `[B, V]`, or with `score` (log p(ids[:, t+1] | ...), argmax == target), each `[B, T-1]`."""
  if not score:
    return decoder.logits(h[:, -1:])[:, 0]
  logits = decoder.logits(h[:, :-1])
  targets = ids[:, 1:]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  return logp, jnp.argmax(logits, axis=-1) == targets


# ----------------------------------------------------------------------------
# How a stage runs
# ----------------------------------------------------------------------------


class StepOps(Protocol):
  """Runs the stages of `forward`. `decoder` and `layer(l)` are the modules stages take."""

  decoder: Any

  def layer(self, l: int) -> Any:
    """Decoder layer l, as stages take it."""

  def run(self, name: str, layer: int | None, fn: Callable, *args, donate: tuple[int, ...] = ()) -> Any:
    """`fn(*args)` as stage `name` of decoder layer `layer` (None: embedding / head); `donate`: arg indices."""

  def cond(self, pred, name: str, layer: int | None, fn: Callable, otherwise: Callable, *args) -> Any:
    """`fn(*args)` as a stage where `pred` (a scalar bool array), else `otherwise(*args)`."""


class InlineOps:
  """Stages traced in place into one program, each under `jax.named_scope`; modules rebuilt from the params."""

  def __init__(self, graphdef, params):
    self.decoder = nnx.merge(graphdef, params)

  def layer(self, l: int):
    return self.decoder.layers[l]

  def run(self, name, layer, fn, *args, donate=()):
    with jax.named_scope(name if layer is None else f"{name}_{layer}"):
      return fn(*args)

  def cond(self, pred, name, layer, fn, otherwise, *args):
    with jax.named_scope(name if layer is None else f"{name}_{layer}"):
      return jax.lax.cond(pred, lambda: fn(*args), lambda: otherwise(*args))


@jax.tree_util.register_pytree_node_class
class BoundModule:
  """An NNX module as a pytree: its parameter leaves (traced) and its structure (static); `build` rebuilds it."""

  def __init__(self, structure, leaves):
    self.structure, self.leaves = structure, leaves

  @classmethod
  def of(cls, module) -> BoundModule:
    graphdef, params = nnx.split(module)
    leaves, treedef = jax.tree.flatten(params)
    return cls((graphdef, treedef), leaves)

  def build(self):
    graphdef, treedef = self.structure
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, self.leaves))

  def tree_flatten(self):
    return self.leaves, self.structure

  @classmethod
  def tree_unflatten(cls, structure, leaves):
    return cls(structure, leaves)


def _stage_key(fn) -> Any:
  """A hashable identity of a stage function, partials compared by value."""
  if isinstance(fn, functools.partial):
    return fn.func, fn.args, tuple(sorted(fn.keywords.items()))
  return fn


class StagedOps:
  """Every stage its own jitted call; with `timer`, blocked on and timed.

  decoder: the NNX decoder; jits: the caller's dict of jitted stages (kept
  across steps); timer: None, or `timer(layer, name, seconds)` per stage.
  """

  def __init__(self, decoder, jits: dict, timer: Callable | None = None):
    self.decoder = BoundModule.of(decoder)
    self._layers = [BoundModule.of(layer) for layer in decoder.layers]
    self.jits, self.timer = jits, timer

  def layer(self, l: int):
    return self._layers[l]

  def _compiled(self, fn, donate):
    key = (_stage_key(fn), donate)
    if key not in self.jits:
      built = lambda *args: fn(*(a.build() if isinstance(a, BoundModule) else a for a in args))
      self.jits[key] = jax.jit(built, donate_argnums=donate, compiler_options=compiler_options())
    return self.jits[key]

  def run(self, name, layer, fn, *args, donate=()):
    t = time.perf_counter()
    out = self._compiled(fn, donate)(*args)
    if self.timer is not None:
      jax.block_until_ready(out)
      self.timer(layer, name, time.perf_counter() - t)
    return out

  def cond(self, pred, name, layer, fn, otherwise, *args):
    return self.run(name, layer, fn, *args) if bool(pred) else otherwise(*args)


# ----------------------------------------------------------------------------
# The step, written once
# ----------------------------------------------------------------------------


class _Previous(NamedTuple):
  """The MoE layer before the current one, as the current layer's predictor sees it.

  layer: its index; h: its residual stream after attention `[B, T, D]`; x: its
  MoE input `[N, D]`; prov: its provisional output `[B, T, D]` (shared experts
  and the experts resident before its plan: no demand loads, no CPU pairs);
  missed: whether it had demand loads or CPU pairs (None: it could not), i.e.
  whether `prov` differs from its output; keep: in a shared pool, `[G * E]`
  the keys of the experts it computed; dense_between: dense layers separate it
  from the current one.
  """

  layer: int
  h: jax.Array
  x: jax.Array
  prov: jax.Array
  missed: jax.Array | None
  keep: jax.Array | None
  dense_between: bool


def _may_cpu(cfg: StepConfig, pools, l: int) -> bool:
  """Whether MoE layer l can have pairs that run on the host in a scheduled step."""
  place = cfg.placements[l]
  if place.residency == Residency.CPU:
    return True
  if place.residency != Residency.CACHED:
    return False
  slots = pools[place.pool].table.num_slots
  return cfg.spec.cpu_compute != "never" or slots < cfg.config.num_experts


def _prefetches(cfg: StepConfig, l: int) -> bool:
  """Whether a prefetch is issued for MoE layer l (a cached layer after another MoE layer)."""
  moe_ids = cfg.config.moe_layer_ids
  return (
    cfg.spec.prefetch is not None
    and not cfg.exact
    and cfg.placements[l].residency == Residency.CACHED
    and moe_ids.index(l) > 0
  )


def _feeds_provisional(cfg: StepConfig, l: int) -> bool:
  """Whether the MoE layer after MoE layer l predicts from l's provisional output."""
  moe_ids = cfg.config.moe_layer_ids
  i = moe_ids.index(l)
  return cfg.spec.prefetch == "provisional" and i + 1 < len(moe_ids) and _prefetches(cfg, moe_ids[i + 1])


def _prediction(ops: StepOps, cfg: StepConfig, l: int, prev: _Previous, scores, inputs, kv) -> jax.Array:
  """The predicted router scores `[N, E]` of MoE layer l, from what the previous MoE layer had, for the prefetch.

  "provisional" (SPEC section 5): layer l's attention (with its KV cache) and
  gate on the previous MoE layer's provisional output. When that layer had no
  demand loads and no CPU pairs, its provisional output is its output, so the
  prediction equals layer l's own scores, which serve unchanged (dense layers
  in between are skipped by the predictor). "gate": layer l's gate on the
  previous layer's MoE input. "layernorm": `layernorm_scores`. "activation":
  no score prediction (counts).
  """
  kind = cfg.spec.prefetch
  layer = ops.layer(l)
  if kind == "gate":
    return ops.run("prefetch", l, gate_scores, layer, prev.x)
  if kind == "layernorm":  # without the residual for Qwen2-MoE, as the release runs it (docs/smoe_release.md)
    return ops.run(
      "prefetch",
      l,
      functools.partial(layernorm_scores, cfg.config.model_type != "qwen2_moe"),
      ops.layer(prev.layer),
      layer,
      prev.x,
      prev.h,
    )
  if kind == "activation":
    return jnp.zeros(scores.shape, jnp.float32)
  if prev.dense_between:
    return ops.run("prefetch", l, peek_scores, layer, prev.prov, inputs, kv)
  if prev.missed is None:
    return scores
  return ops.cond(prev.missed, "prefetch", l, peek_scores, lambda *_: scores, layer, prev.prov, inputs, kv)


class _LayerOut(NamedTuple):
  """One MoE layer's results in `forward`: decision, the weights its device pairs read, the CPU experts' output
  `[N, D]` float32 (None: it could have none), whether it missed (None: it could not)."""

  decision: LayerDecision
  weights: moe.ExpertWeights
  extra: jax.Array | None
  missed: jax.Array | None


def _exact_layer(ops: StepOps, cfg: StepConfig, l: int, pools: list, scores, store, valid) -> _LayerOut:
  """An MoE layer with every expert on the device: resident, or streamed in (then it may warm its slots)."""
  place = cfg.placements[l]
  resident = place.residency == Residency.RESIDENT
  residency = Residency.RESIDENT if resident else Residency.STREAMED
  d = ops.run("plan", l, functools.partial(schedule_exact, cfg.config, residency), ops.layer(l), scores, valid)
  weights = store if resident else ops.run("copy", l, stream, store)
  if cfg.warm and place.residency == Residency.CACHED:
    pool = pools[place.pool]
    table, slots = ops.run(
      "copy",
      l,
      functools.partial(warm, cfg.spec.eviction or "score", place.group),
      pool.table,
      scores,
      valid,
      d.experts,
      pool.weights,
      weights,
      donate=(4,),
    )
    pools[place.pool] = SlotPool(table, slots)
  return _LayerOut(d, weights, None, None)


def _scheduled_layer(
  ops: StepOps,
  cfg: StepConfig,
  consts: StepConstants,
  l: int,
  pools: list,
  routed: tuple[jax.Array, jax.Array],
  prefetched: tuple[jax.Array, PrefetchGate] | None,
  valid,
) -> _LayerOut:
  """An MoE layer under the policy: prefetch, plan, copies, CPU experts.

  routed: (x `[N, D]`, scores `[N, E]`); prefetched: (predicted scores `[N, E]`, `PrefetchGate`), or None.
  """
  config, spec, place = cfg.config, cfg.spec, cfg.placements[l]
  x, scores = routed
  store = consts.experts[l]
  plan = LayerPlan(config, spec, cfg.substitute_weight, place.group)
  cached = place.residency == Residency.CACHED
  table, weights = (pools[place.pool].table, pools[place.pool].weights) if cached else (None, None)
  arrived = jnp.zeros(config.num_experts, bool)
  if prefetched is not None:
    pred, gate = prefetched
    table, adm, arrived = ops.run(
      "prefetch", l, functools.partial(prefetch_layer, plan), ops.layer(l), pred, valid, table, consts.alpha, gate
    )
    weights = ops.run("copy", l, fill_slots, weights, store, adm.experts, adm.slots, donate=(0,))
  knobs = Knobs(consts.alpha, consts.prior_strength, consts.similarity[l])
  d = ops.run(
    "plan", l, functools.partial(schedule_layer, plan), ops.layer(l), scores, valid, table, consts.costs, arrived, knobs
  )
  if cached:
    weights = ops.run("copy", l, fill_slots, weights, store, d.loads, d.load_slots, donate=(0,))
    pools[place.pool] = SlotPool(d.table, weights)
  else:  # no device slots: every pair runs on the host
    weights = moe.ExpertWeights(*(jnp.zeros((1, *w.shape[1:]), w.dtype) for w in store))
  extra = None
  if _may_cpu(cfg, pools, l):
    extra = ops.cond(
      d.counters.pairs_cpu > 0,
      "cpu",
      l,
      functools.partial(cpu_experts, config.hidden_act),
      lambda x, *_: jnp.zeros(x.shape, jnp.float32),
      x,
      store,
      d,
    )
  return _LayerOut(d, weights, extra, d.counters.pairs_demand + d.counters.pairs_cpu > 0)


def _shared_pool_keys(cfg: StepConfig, pools, l: int, d: LayerDecision, valid) -> jax.Array | None:
  """In a pool shared by several layers, `[G * E]` bool: the keys of the experts MoE layer l computed."""
  place = cfg.placements[l]
  if place.residency != Residency.CACHED or pools[place.pool].table.num_groups == 1:
    return None
  e, groups = cfg.config.num_experts, pools[place.pool].table.num_groups
  used = jnp.broadcast_to(valid[:, None], d.experts.shape)
  return jnp.zeros(groups * e, bool).at[place.group * e + d.experts].max(used)


def forward(
  ops: StepOps, cfg: StepConfig, consts: StepConstants, state: DecodeState, batch: StepInput
) -> tuple[Any, DecodeState, StepRecord]:
  """One forward step of the decoder under the policy: `state -> state`.

  Args:
    ops: how stages run (`InlineOps` / `StagedOps`).
    cfg: the static `StepConfig`.
    consts: parameters, expert store, similarity, alpha, prior strength, costs.
    state: KV cache and slot pools (donated by the jitted programs).
    batch: ids `[B, T]`, rotary positions `[B, T]`, valid `[B, T]` and the cache row of the first token.

  Returns:
    (head output, the new `DecodeState`, `StepRecord`).
  """
  config = cfg.config
  kv, pools = list(state.kv), list(state.pools)
  inputs = attention_inputs(config, batch.positions, batch.valid, batch.index)
  valid = batch.valid.reshape(-1)
  counters, routing = [], []
  h = ops.run("embed", None, embed, ops.decoder, batch.ids)
  prev = None
  for l, place in enumerate(cfg.placements):
    layer = ops.layer(l)
    if place is None:
      h, kv[l] = ops.run("attention", l, attend_dense, layer, h, inputs, kv[l], donate=(3,))
      prev = prev and prev._replace(dense_between=True)
      continue
    h, x, scores, kv[l] = ops.run("attention", l, attend_route, layer, h, inputs, kv[l], donate=(3,))
    h_attention = h
    if cfg.exact or place.residency == Residency.RESIDENT:
      out = _exact_layer(ops, cfg, l, pools, scores, consts.experts[l], valid)
    else:
      prefetched = None
      if _prefetches(cfg, l):
        enabled = prev.missed if cfg.spec.prefetch_after_miss and prev.missed is not None else jnp.bool_(True)
        prefetched = (_prediction(ops, cfg, l, prev, scores, inputs, kv[l]), PrefetchGate(enabled, prev.keep))
      out = _scheduled_layer(ops, cfg, consts, l, pools, (x, scores), prefetched, valid)
    d = out.decision
    # Pairs whose expert was resident before the plan form the provisional output; demand loads join after it.
    prov, h = ops.run(
      "experts",
      l,
      functools.partial(experts, config.hidden_act, _feeds_provisional(cfg, l)),
      layer,
      h,
      x,
      out.weights,
      d,
      out.extra,
    )
    counters.append(d.counters)
    routing.append((d.experts, d.top))
    prev = _Previous(l, h_attention, x, prov, out.missed, _shared_pool_keys(cfg, pools, l, d, valid), False)
  if cfg.head:
    out = ops.run("head", None, functools.partial(head, cfg.score), ops.decoder, h, batch.ids)
  else:  # no LM head: the output still reads the final hidden state, or XLA would drop the last layer's experts
    final = jnp.sum(h[:, -1].astype(jnp.float32), axis=-1)
    out = jnp.zeros((h.shape[0], config.vocab_size), jnp.float32).at[:, 0].set(final)
  record = StepRecord(LayerCounters.stack(counters), tuple(routing) if cfg.routing else None)
  return out, DecodeState(tuple(kv), tuple(pools)), record


def step_program(cfg: StepConfig, graphdef) -> Callable:
  """`forward` as one jitted program: fn(consts, state, batch) -> (out, state, `StepRecord`), state donated.

  Not cached here: the engine keeps its own programs, so that their compiled
  executables (and code mappings) are freed with it.
  """

  def run(consts: StepConstants, state: DecodeState, batch: StepInput):
    return forward(InlineOps(graphdef, consts.params), cfg, consts, state, batch)

  return jax.jit(run, donate_argnames="state", compiler_options=compiler_options())


class DecodeConfig(NamedTuple):
  """A decode loop's static settings: the step, the scanned length (a bucket of the tokens to emit), sampling."""

  step: StepConfig
  length: int
  temperature: float
  top_p: float


class DecodeInput(NamedTuple):
  """Where a decode loop starts.

  logits `[B, V]` after the prompt; seed: of the sampling key; forced
  `[B, length]` tokens to feed instead of sampling (or None); feed
  `[B, length]` bool, whether step i's token of a row is real; positions
  `[B, 1]` and index: rotary position and cache row of the first step;
  n <= length: tokens to emit.
  """

  logits: jax.Array
  seed: jax.Array
  forced: jax.Array | None
  feed: jax.Array
  positions: jax.Array
  index: jax.Array
  n: jax.Array


class Decoded(NamedTuple):
  """What `decode_program` returns: per emitted token `[length, B]` token, logp, greedy; per forward step the
  `StepRecord` stacked on a leading `[length]` axis; and the state it leaves."""

  tokens: jax.Array
  logp: jax.Array
  greedy: jax.Array
  records: StepRecord
  state: DecodeState


def decode(ops: StepOps, cfg: DecodeConfig, consts: StepConstants, state: DecodeState, start: DecodeInput) -> Decoded:
  """n emitted tokens and the n - 1 forward steps between them, as a scan carrying (logits, key, state).

  Every step is `forward` exactly as `step_program` runs it, so the two agree
  token for token; steps past n - 1 (the scan runs a bucketed length) pass the
  carry on unchanged.
  """

  def emit(i, logits, key):
    token = None if start.forced is None else jax.lax.dynamic_index_in_dim(start.forced, i, axis=1, keepdims=False)
    return sampling.emit(logits, key, token, temperature=cfg.temperature, top_p=cfg.top_p)

  def forward_step(i, carry):
    logits, key, state = carry
    token, logp, greedy, key = emit(i, logits, key)
    batch = StepInput(
      token[:, None], start.positions + i, jax.lax.dynamic_slice_in_dim(start.feed, i, 1, axis=1), start.index + i
    )
    out, state, record = forward(ops, cfg.step, consts, state, batch)
    return (out, key, state), (token, logp, greedy, record)

  init = (start.logits, jax.random.PRNGKey(start.seed), state)
  shapes = jax.eval_shape(forward_step, jnp.int32(0), init)[1]

  def skip(i, carry):
    del i  # steps past n - 1 pass the carry on
    return carry, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  def scan_step(carry, i):
    return jax.lax.cond(i < start.n - 1, forward_step, skip, i, carry)

  (logits, key, state), (tokens, logp, greedy, records) = jax.lax.scan(scan_step, init, jnp.arange(cfg.length))
  token, last_logp, last_greedy, _ = emit(start.n - 1, logits, key)
  last = lambda y, v: jax.lax.dynamic_update_index_in_dim(y, v, start.n - 1, 0)
  return Decoded(last(tokens, token), last(logp, last_logp), last(greedy, last_greedy), records, state)


def decode_program(cfg: DecodeConfig, graphdef) -> Callable:
  """`decode` as one jitted program: fn(consts, state, start) -> `Decoded`, state donated."""

  def run(consts: StepConstants, state: DecodeState, start: DecodeInput):
    return decode(InlineOps(graphdef, consts.params), cfg, consts, state, start)

  return jax.jit(run, donate_argnames="state", compiler_options=compiler_options())
