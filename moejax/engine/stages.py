"""The engine's forward step, written once against an `ops` object.

A step runs the decoder layer by layer. At each MoE layer the policy's
scheduling decision (substitution, copies with eviction, CPU work) is made
from the router scores, the layer's cache slots are filled from the host
store, pairs left off the device run on the host, and the layer's experts are
then read from its slots. `forward` holds this data flow once and runs two
ways:

- fused (`fused_forward`, the default): the whole step is one jitted program.
  Copies happen inside it: each expert is sliced from the `pinned_host` store,
  moved to device memory and written into its slot
  (`moejax.offload.cache.fill_slots`), and CPU pairs run under
  `compute_on("device_host")` (`moejax.offload.cpu.host_experts`). One
  dispatch and one small device->host read (the counters) per step.
- staged (`StagedOps`): every stage its own jitted call, blocked on and timed
  per layer by name ("attention", "experts", "plan", "prefetch", "copy",
  "cpu", "head"); the engine's profile mode. It can also measure the copy and
  CPU costs that the balance policies' split uses.

The step between two MoE layers is a *segment*: the previous MoE layer's
experts (or the embedding), the dense layers in between, then the next MoE
layer's attention, router, prefetch and plan (or the output head).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.engine import sampling
from moejax.engine.schedule import COUNTERS, LayerDecision, prefetch_layer, schedule_exact, schedule_layer
from moejax.models import moe
from moejax.models.config import MoEConfig
from moejax.models.decoder import lm_logits
from moejax.models.layers import attention_inputs
from moejax.offload.cache import fill_slots
from moejax.offload.cpu import host_experts
from moejax.scheduling import balance, cache
from moejax.scheduling.policies import PolicySpec

_CPU_PAIRS = COUNTERS.index("cpu_pairs")
_CPU_EXPERTS = COUNTERS.index("cpu_experts")


class ModuleDef(NamedTuple):
  """Static half of an NNX module kept as flat leaves: rebuilt with `build` (cheap to pass to jit)."""

  graphdef: Any
  treedef: Any

  def build(self, leaves):
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def split_module(module) -> tuple[ModuleDef, list[jax.Array]]:
  graphdef, state = nnx.split(module)
  leaves, treedef = jax.tree.flatten(state)
  return ModuleDef(graphdef, treedef), leaves


class Edges(nnx.Module):
  """The decoder's embedding, final norm and LM head (shares the decoder's variables)."""

  def __init__(self, decoder):
    self.embed_tokens = decoder.embed_tokens
    self.norm = decoder.norm
    self.lm_head = decoder.lm_head

  def embed(self, ids):
    return jnp.take(self.embed_tokens[...], ids, axis=0)

  def logits(self, h):
    return lm_logits(self.norm, self.lm_head, self.embed_tokens[...], h)


class Segment(NamedTuple):
  """From MoE layer `prev`'s experts (None: the embedding) through `dense` to layer `next`'s plan (None: the head).

  prefetch: predictor run for `next` ("provisional", "gate", "activation") or None.
  cpu: `next` may compute pairs on the host.
  """

  prev: int | None
  dense: tuple[int, ...]
  next: int | None
  prefetch: str | None
  cpu: bool


class StepPlan(NamedTuple):
  """What one forward step computes (static, hashable).

  exact: every MoE layer streams all its experts in and computes the model's
    own routing (exact prefill, layerwise policy); warm: then fills the
    layer's cache from the streamed experts.
  score: the head returns next-token log-probs of all positions (else the last
    position's logits); keep_experts: records the experts computed per pair.
  """

  config: MoEConfig
  spec: PolicySpec
  substitute_weight: str
  segments: tuple[Segment, ...]
  exact: bool
  warm: bool
  score: bool
  keep_experts: bool


class Records(NamedTuple):
  """What the host reads after a step, per MoE layer in order.

  host: `[L_moe, len(COUNTERS) + 2]` int32: the plan's counters, then the
  experts copied on demand and by the prefetch. experts: per MoE layer
  `[N, k]` experts computed per pair (with `keep_experts`), else None.
  """

  host: Any
  experts: Any


# ----------------------------------------------------------------------------
# Stages: f(static, module, *args); the module is a decoder layer, `Edges`, or None.
# ----------------------------------------------------------------------------


def _embed(_, edges, ids):
  return edges.embed(ids)


def _attend_dense(_, layer, h, inputs, kv):
  h, kv = layer.attend(h, inputs, kv)
  return layer.dense_ffn(h), kv


def _attend_route(_, layer, h, inputs, kv):
  h, kv = layer.attend(h, inputs, kv)
  x = layer.ffn_input(h)
  return h, x, layer.router_scores(x), kv


def _peek_scores(_, layer, h, inputs, kv):
  """Router scores for hidden states h without keeping the KV write."""
  h, _ = layer.attend(h, inputs, kv)
  return layer.router_scores(layer.ffn_input(h))


def _gate_scores(_, layer, x):
  return layer.router_scores(x)


def _experts(act, layer, h, x, buffers, slots, mix, extra):
  """Routed experts from slot buffers + shared experts + residual.

  Returns (provisional, h): the provisional output counts only the device
  experts; h adds `extra` `[N, D]` float32 (CPU experts; None: nothing).
  """
  routed = moe.routed_experts(x, buffers, slots, mix, act)
  prov = layer.finish_moe(h, x, routed)
  if extra is None:
    return prov, prov
  return prov, layer.finish_moe(h, x, (routed.astype(jnp.float32) + extra).astype(x.dtype))


def _schedule(static, layer, scores, valid, state, costs, alpha, sim, prefetched, prior):
  config, spec, substitute_weight, exact = static
  bias = layer.mlp.router.selection_bias()
  if exact:
    return schedule_exact(config, scores, valid, state, bias)
  return schedule_layer(config, spec, substitute_weight, scores, valid, state, costs, alpha, sim, bias, prefetched,
                        prior)


def _prefetch(static, layer, pred, valid, state, alpha):
  config, spec = static
  return prefetch_layer(config, spec, pred, valid, state, alpha, layer.mlp.router.selection_bias())


def _fill(_, __, buffers, source, experts, slots):
  return fill_slots(buffers, source, experts, slots)


def _stream(_, __, store):
  """Every expert of a layer `[E, ...]` copied to device memory (slot = expert id)."""
  return jax.device_put(store, jax.memory.Space.Device)


def _warm(policy, _, state, scores, valid, selected, buffers, streamed):
  """After an exact layer: admits the experts its tokens used (`selected` `[N, k]`), most important first, into
  the cache, copying them from `streamed` (already on the device: nothing more crosses the host link)."""
  e = scores.shape[-1]
  used = jnp.zeros(e, bool).at[selected].max(jnp.broadcast_to(valid[:, None], selected.shape))
  priority = jnp.max(jnp.where(valid[:, None], scores, 0.0), axis=0)
  state, adm = cache.admit(state, used, jnp.zeros(e, bool), priority, policy=policy,
                           max_loads=min(state.num_slots, e))
  return cache.observe(state, scores, used, valid), fill_slots(buffers, streamed, adm.experts, adm.slots)


def _cpu(act, _, x, store, experts, mix, on_cpu):
  return host_experts(x, store, experts, mix, on_cpu, act)


def _head(score, edges, h, ids):
  """Last-position logits `[B, V]`, or with `score` (log p(ids[:, t+1] | ...), argmax == target), each `[B, T-1]`."""
  if not score:
    return edges.logits(h[:, -1:])[:, 0]
  logits = edges.logits(h[:, :-1])
  targets = ids[:, 1:]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  return logp, jnp.argmax(logits, axis=-1) == targets


def _record(keep_experts, _, decision: LayerDecision, prefetch):
  n_prefetch = jnp.int32(0) if prefetch is None else (prefetch.experts >= 0).sum()
  host = jnp.concatenate([decision.counters, jnp.stack([(decision.loads >= 0).sum(), n_prefetch]).astype(jnp.int32)])
  return host, decision.experts if keep_experts else None


# ----------------------------------------------------------------------------
# The step, written once
# ----------------------------------------------------------------------------


def forward(ops, step: StepPlan, ids, inputs, valid, kvs, states, buffers, store, costs, alpha, sims, prior):
  """One forward step of the decoder under the policy.

  Args:
    ops: `InlineOps` (inside one jit) or `StagedOps`.
    step: the static `StepPlan`.
    ids: `[B, T]` token ids; inputs: the step's `AttentionInputs`; valid: `[N]`
      bool, real tokens (N = B * T).
    kvs: per layer, its KV cache.
    states, buffers, store, sims: dicts keyed by MoE layer: `CacheState` (or
      None), slot buffers `ExpertWeights` `[S, ...]` (or None), host store
      `[E, ...]` (None: experts resident in `buffers`), similarity `[E, E]` (or None).
    costs, alpha, prior: cost model, substitution threshold, cache-prior strength.

  Returns:
    (head output, kvs, states, buffers, costs, `Records`).
  """
  kvs, states, buffers = list(kvs), dict(states), dict(buffers)
  records = []
  h = ops.embed(ids)
  pending = None  # the MoE layer whose experts start the next segment
  for seg in step.segments:
    extra = has_cpu = None
    if seg.prev is not None:
      h_in, x, layer_buffers, slots, mix, extra, has_cpu = pending
      prov, h = ops.experts(seg.prev, h_in, x, layer_buffers, slots, mix, extra)
    for l in seg.dense:
      h, kvs[l] = ops.attend_dense(l, h, inputs, kvs[l])
    if seg.next is None:
      return ops.head(step.score, h, ids), kvs, states, buffers, costs, ops.pack(records)
    l = seg.next
    # The paper's predictor: the next layer's attention and gate on the provisional output. Without CPU pairs or
    # dense layers in between that is exactly the real next layer's input, so its real scores serve.
    pred = None
    if seg.prefetch == "provisional" and (seg.dense or extra is not None):
      pred = ops.peek_scores(l, prov, inputs, kvs[l], when=None if seg.dense else has_cpu)
    prev_x = None if seg.prev is None else x
    h, x, scores, kvs[l] = ops.attend_route(l, h, inputs, kvs[l])
    state, adm, prefetched = states[l], None, jnp.zeros(step.config.num_experts, bool)
    if seg.prefetch is not None:
      if seg.prefetch == "provisional":
        pred = ops.either(None if seg.dense else has_cpu, pred, scores)
      elif seg.prefetch == "gate":
        pred = ops.gate_scores(l, prev_x)
      else:  # activation counts: no score prediction
        pred = jnp.zeros(scores.shape, jnp.float32)
      state, adm, prefetched = ops.prefetch(l, step, pred, valid, state, alpha)
    d = ops.schedule(l, step, scores, valid, state, costs, alpha, sims[l], prefetched, prior)
    states[l] = d.state
    extra = has_cpu = None
    if step.exact:
      layer_buffers = buffers[l] if store[l] is None else ops.stream(l, store[l])
      if step.warm and states[l] is not None:
        states[l], buffers[l] = ops.warm(l, step, states[l], scores, valid, d.experts, buffers[l], layer_buffers)
    else:
      if store[l] is not None and states[l] is not None:
        if adm is not None:  # the prefetch's copies, then the plan's
          buffers[l] = ops.fill(l, buffers[l], store[l], adm.experts, adm.slots)
        buffers[l] = ops.fill(l, buffers[l], store[l], d.loads, d.load_slots)
      if seg.cpu:
        has_cpu = d.counters[_CPU_PAIRS] > 0
        extra = ops.cpu(l, has_cpu, x, store[l], d)
      layer_buffers = buffers[l]
      costs = ops.measured_costs(costs)
    records.append(ops.record(d, adm, step.keep_experts))
    pending = (h, x, layer_buffers, d.slots, d.mix, extra, has_cpu)
  raise ValueError("a step's last segment must end with the output head")


class InlineOps:
  """Stages called directly on the modules, all inside one jit (`fused_forward`)."""

  def __init__(self, act: str, layers: list, edges):
    self.act, self.layers, self.edges = act, layers, edges

  @classmethod
  def build(cls, act: str, layer_defs, edges_def: ModuleDef, layer_leaves, edges_leaves) -> InlineOps:
    """Rebuilds the modules from their `ModuleDef`s and leaves (inside a jit)."""
    return cls(act, [d.build(lv) for d, lv in zip(layer_defs, layer_leaves)], edges_def.build(edges_leaves))

  def embed(self, ids):
    return _embed(None, self.edges, ids)

  def attend_dense(self, l, h, inputs, kv):
    return _attend_dense(None, self.layers[l], h, inputs, kv)

  def attend_route(self, l, h, inputs, kv):
    return _attend_route(None, self.layers[l], h, inputs, kv)

  def peek_scores(self, l, h, inputs, kv, when):
    peek = lambda: _peek_scores(None, self.layers[l], h, inputs, kv)
    if when is None:
      return peek()
    shape = jax.eval_shape(peek)
    return jax.lax.cond(when, peek, lambda: jnp.zeros(shape.shape, shape.dtype))

  @staticmethod
  def either(when, pred, scores):
    if pred is None:
      return scores
    return pred if when is None else jnp.where(when, pred, scores)

  def gate_scores(self, l, x):
    return _gate_scores(None, self.layers[l], x)

  def experts(self, l, h, x, buffers, slots, mix, extra):
    return _experts(self.act, self.layers[l], h, x, buffers, slots, mix, extra)

  def schedule(self, l, step, scores, valid, state, costs, alpha, sim, prefetched, prior):
    return _schedule((step.config, step.spec, step.substitute_weight, step.exact), self.layers[l], scores, valid,
                     state, costs, alpha, sim, prefetched, prior)

  def prefetch(self, l, step, pred, valid, state, alpha):
    return _prefetch((step.config, step.spec), self.layers[l], pred, valid, state, alpha)

  def fill(self, l, buffers, source, experts, slots):
    return _fill(None, None, buffers, source, experts, slots)

  def stream(self, l, store):
    return _stream(None, None, store)

  def warm(self, l, step, state, scores, valid, selected, buffers, streamed):
    return _warm(step.spec.eviction or "score", None, state, scores, valid, selected, buffers, streamed)

  def cpu(self, l, has_cpu, x, store, d: LayerDecision):
    return jax.lax.cond(has_cpu, lambda: _cpu(self.act, None, x, store, d.experts, d.mix, d.on_cpu),
                        lambda: jnp.zeros(x.shape, jnp.float32))

  @staticmethod
  def measured_costs(costs):
    return costs

  def head(self, score, h, ids):
    return _head(score, self.edges, h, ids)

  @staticmethod
  def record(d, adm, keep_experts):
    return _record(keep_experts, None, d, adm)

  @staticmethod
  def pack(records):
    return Records(jnp.stack([r[0] for r in records]), [r[1] for r in records])


def fused_forward(step: StepPlan, act: str, layer_defs: tuple, edges_def: ModuleDef, donate_buffers: bool) -> Callable:
  """`forward` as one jitted call: fn(layer_leaves, edges_leaves, ids, inputs, valid, kvs, states, buffers, store,
  costs, alpha, sims, prior), modules rebuilt inside from their leaves (`layer_defs`: per layer).

  KV caches and cache states are donated (updated in place); slot buffers too
  with `donate_buffers`; without it they are the model's own resident experts,
  never written, and the call returns None in their place.
  Not cached here: the engine keeps its own jitted functions, so that its
  compiled executables (and their code mappings) are freed with it.
  """

  def run(layer_leaves, edges_leaves, *args):
    ops = InlineOps.build(act, layer_defs, edges_def, layer_leaves, edges_leaves)
    out, kvs, states, buffers, costs, records = forward(ops, step, *args)
    # Returning buffers that are not donated would copy them (the model's whole resident expert set) every step.
    return out, kvs, states, buffers if donate_buffers else None, costs, records

  return jax.jit(run, donate_argnums=(5, 6, 7) if donate_buffers else (5, 6))


class Decoded(NamedTuple):
  """What `fused_decode` returns: per emitted token `[length, B]` token, logp, greedy; per forward step the
  `Records` stacked on a leading `[length]` axis; and the state it leaves (kvs, states, buffers, costs)."""

  tokens: Any
  logp: Any
  greedy: Any
  records: Records
  kvs: Any
  states: Any
  buffers: Any
  costs: Any


def fused_decode(step: StepPlan, act: str, layer_defs: tuple, edges_def: ModuleDef, donate_buffers: bool, *,
                 length: int, temperature: float, top_p: float) -> Callable:
  """Decoding on the device: n emitted tokens and the n - 1 forward steps between them as one program.

  fn(layer_leaves, edges_leaves, logits, key, forced, feed, positions, index, n, kvs, states, buffers, store,
  costs, alpha, sims, prior) -> `Decoded`. logits `[B, V]` come from the prompt; forced `[B, length]` tokens to
  feed instead of sampling (or None); feed `[B, length]` bool, whether forward step i's token of a row is
  real; positions `[B, 1]` and index: rotary position and cache row of the first step, advancing by one per
  step; n <= length (traced). Every step is `forward` exactly as `fused_forward` runs it, so the two agree
  token for token; the host reads all steps' counters once at the end.
  """

  def run(layer_leaves, edges_leaves, logits, key, forced, feed, positions, index, n, kvs, states, buffers, store,
          costs, alpha, sims, prior):
    ops = InlineOps.build(act, layer_defs, edges_def, layer_leaves, edges_leaves)

    def emit(i, logits, key):
      token = None if forced is None else jax.lax.dynamic_index_in_dim(forced, i, axis=1, keepdims=False)
      return sampling.emit(logits, key, token, temperature=temperature, top_p=top_p)

    def forward_step(i, carry):
      logits, key, kvs, states, buffers, costs = carry
      token, logp, greedy, key = emit(i, logits, key)
      valid = jax.lax.dynamic_slice_in_dim(feed, i, 1, axis=1)
      inputs = attention_inputs(step.config, positions + i, valid, index + i)
      out, kvs, states, buffers, costs, records = forward(ops, step, token[:, None], inputs, valid.reshape(-1), kvs,
                                                          states, buffers, store, costs, alpha, sims, prior)
      return (out, key, kvs, states, buffers, costs), (token, logp, greedy, records)

    init = (logits, key, kvs, states, buffers, costs)
    shapes = jax.eval_shape(forward_step, jnp.int32(0), init)[1]

    def skip(_, carry):
      return carry, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def scan_step(carry, i):  # steps past n - 1 only pass the carry on (length is a bucket of n)
      return jax.lax.cond(i < n - 1, forward_step, skip, i, carry)

    carry, ys = jax.lax.scan(scan_step, init, jnp.arange(length))
    logits, key, kvs, states, buffers, costs = carry
    token, logp, greedy, _ = emit(n - 1, logits, key)
    last = lambda y, v: jax.lax.dynamic_update_index_in_dim(y, v, n - 1, 0)
    return Decoded(last(ys[0], token), last(ys[1], logp), last(ys[2], greedy), ys[3], kvs, states,
                   buffers if donate_buffers else None, costs)

  return jax.jit(run, donate_argnums=(9, 10, 11) if donate_buffers else (9, 10))


class StagedOps:
  """Stages as separate jitted calls; with `timer`, each is blocked on and timed.

  timer: None, or `timer(layer, name, seconds)` receiving each stage's layer
    (None for embedding and head) and name.
  measure_costs: time every copy and CPU pass (blocking) and fold them into
    the cost model (the balance policies' split), as `measured_costs` returns it.
  jits: the caller's dict of jitted stages (kept across steps).
  """

  def __init__(self, act: str, layers: list, edges, jits: dict, timer=None, measure_costs: bool = False):
    self.act, self.layers, self.edges, self.jits = act, layers, edges, jits
    self.timer, self.measure_costs = timer, measure_costs
    self._measured = {}

  def _call(self, layer, name, fn, static, module, *args, donate=()):
    mdef, leaves = module if module is not None else (None, None)
    t = time.perf_counter()
    key = (fn, static, mdef, donate)
    if key not in self.jits:
      build = (lambda lv: mdef.build(lv)) if mdef is not None else (lambda lv: None)
      self.jits[key] = jax.jit(lambda lv, *a: fn(static, build(lv), *a), donate_argnums=donate)
    out = self.jits[key](leaves, *args)
    seconds = None
    if self.timer is not None or (self.measure_costs and name in ("copy", "cpu")):
      jax.block_until_ready(out)
      seconds = time.perf_counter() - t
      if self.timer is not None:
        self.timer(layer, name, seconds)
    return out, seconds

  def _run(self, layer, name, fn, static, module, *args, donate=()):
    return self._call(layer, name, fn, static, module, *args, donate=donate)[0]

  def embed(self, ids):
    return self._run(None, "head", _embed, None, self.edges, ids)

  def attend_dense(self, l, h, inputs, kv):
    return self._run(l, "attention", _attend_dense, None, self.layers[l], h, inputs, kv, donate=(3,))

  def attend_route(self, l, h, inputs, kv):
    return self._run(l, "attention", _attend_route, None, self.layers[l], h, inputs, kv, donate=(3,))

  def peek_scores(self, l, h, inputs, kv, when):
    if when is not None and not bool(when):
      return None
    return self._run(l, "prefetch", _peek_scores, None, self.layers[l], h, inputs, kv)

  @staticmethod
  def either(when, pred, scores):
    return scores if pred is None else pred

  def gate_scores(self, l, x):
    return self._run(l, "prefetch", _gate_scores, None, self.layers[l], x)

  def experts(self, l, h, x, buffers, slots, mix, extra):
    return self._run(l, "experts", _experts, self.act, self.layers[l], h, x, buffers, slots, mix, extra)

  def schedule(self, l, step, scores, valid, state, costs, alpha, sim, prefetched, prior):
    return self._run(l, "plan", _schedule, (step.config, step.spec, step.substitute_weight, step.exact),
                     self.layers[l], scores, valid, state, costs, alpha, sim, prefetched, prior)

  def prefetch(self, l, step, pred, valid, state, alpha):
    return self._run(l, "prefetch", _prefetch, (step.config, step.spec), self.layers[l], pred, valid, state, alpha)

  def fill(self, l, buffers, source, experts, slots):
    n = int((np.asarray(experts) >= 0).sum())
    if not n:
      return buffers
    out, seconds = self._call(l, "copy", _fill, None, None, buffers, source, experts, slots, donate=(1,))
    if seconds is not None:
      total, count = self._measured.get("load", (0.0, 0))
      self._measured["load"] = (total + seconds, count + n)
    return out

  def stream(self, l, store):
    return self._run(l, "copy", _stream, None, None, store)

  def warm(self, l, step, state, scores, valid, selected, buffers, streamed):
    return self._run(l, "copy", _warm, step.spec.eviction or "score", None, state, scores, valid, selected, buffers,
                     streamed, donate=(5,))

  def cpu(self, l, has_cpu, x, store, d: LayerDecision):
    if not bool(has_cpu):
      return None
    out, seconds = self._call(l, "cpu", _cpu, self.act, None, x, store, d.experts, d.mix, d.on_cpu)
    if seconds is not None:
      self._measured["cpu"] = (seconds, int(d.counters[_CPU_EXPERTS]))
    return out

  def measured_costs(self, costs):
    """Folds the copies and CPU pass timed since the last call into `costs` (with `measure_costs`)."""
    if self.measure_costs and self._measured:
      load_s, n_load = self._measured.get("load", (None, 0))
      cpu_s, n_cpu = self._measured.get("cpu", (None, 0))
      costs = balance.update_costs(costs, load_s=load_s, n_load=n_load, cpu_s=cpu_s, n_cpu=n_cpu)
    self._measured = {}
    return costs

  def head(self, score, h, ids):
    return self._run(None, "head", _head, score, self.edges, h, ids)

  def record(self, d, adm, keep_experts):
    return self._run(None, "plan", _record, keep_experts, None, d, adm)

  @staticmethod
  def pack(records):
    return Records(np.stack([np.asarray(r[0]) for r in records]), [r[1] for r in records])
