"""The engine's device work between two host decisions, as one jitted segment.

A forward step alternates device compute and host work (copies into the
expert cache, CPU experts). The device work between two MoE layers is one
*segment*: the previous MoE layer's experts (from its cache slots) and shared
experts, the dense layers in between, the next MoE layer's attention and
router, the prefetch for it (predictor + admission) and its scheduling
decision. The first segment starts from the embedding, the last ends with the
output head. `segment` is written once against an `ops` object and runs two
ways:

- fused (`fused_segment`): the whole segment traced into one jit, modules
  rebuilt inside it from flat leaves. One dispatch per MoE layer; the default.
- staged (`StagedOps`): every stage its own jitted call, optionally blocked on
  and timed by name ("attention", "experts", "plan", "prefetch", "head"); the
  engine's profile mode.

Segments are keyed by what they compute, not by layer index, so layers with
equal structure share one compilation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.engine.schedule import LayerDecision, prefetch_layer, schedule_exact, schedule_layer
from moejax.models import moe
from moejax.models.config import MoEConfig
from moejax.models.decoder import lm_logits
from moejax.scheduling.policies import PolicySpec


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


class Plan(NamedTuple):
  """What a segment computes (static, hashable; no layer indices).

  has_prev: starts from a MoE layer's experts (else from the embedding).
  n_dense: dense layers in between.
  has_next: ends with a MoE layer's plan (else with the output head).
  prefetch: predictor for the next layer ("provisional", "gate",
    "activation") or None (no prefetch in this segment).
  exact: the next layer streams every expert (own routing, no cache).
  score: the head returns next-token log-probs of all positions (else the
    last position's logits).
  """

  config: MoEConfig
  spec: PolicySpec
  substitute_weight: str
  has_prev: bool
  n_dense: int
  has_next: bool
  prefetch: str | None
  exact: bool
  score: bool


class SegmentOut(NamedTuple):
  """h `[B, T, D]`; x `[N, D]` FFN input and scores `[N, E]` of the next MoE layer; kvs of the
  segment's layers; decision / prefetch admission for the next layer; host: their `pack_host`
  vector; out: the head's output (last segment)."""

  h: Any
  x: Any
  scores: Any
  kvs: list
  decision: LayerDecision | None
  prefetch: Any
  host: Any
  out: Any


# ----------------------------------------------------------------------------
# Stages: f(static, module, *args); the module is a layer or `Edges`.
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


def _head(score, edges, h, ids):
  """Last-position logits `[B, V]`, or with `score` (log p(ids[:, t+1] | ...), argmax == target), each `[B, T-1]`."""
  if not score:
    return edges.logits(h[:, -1:])[:, 0]
  logits = edges.logits(h[:, :-1])
  targets = ids[:, 1:]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
  return logp, jnp.argmax(logits, axis=-1) == targets


def pack_host(decision: LayerDecision, prefetch) -> jax.Array:
  """The int32 vector the host reads after a segment: loads, load slots, counters[, prefetch experts, slots]."""
  parts = [decision.loads, decision.load_slots, decision.counters]
  if prefetch is not None:
    parts += [prefetch.experts, prefetch.slots]
  return jnp.concatenate(parts)


# ----------------------------------------------------------------------------
# The segment, written once
# ----------------------------------------------------------------------------


def segment(ops, plan: Plan, h, x, buffers, slots, mix, extra, ids, inputs, kvs, state, costs, alpha, sim, valid,
            prior) -> SegmentOut:
  """Device work from MoE layer `prev`'s experts (or the embedding) to layer `next`'s plan (or the head).

  Args:
    ops: `InlineOps` (inside one jit) or `StagedOps`.
    plan: the static `Plan`.
    h: `[B, T, D]` residual entering prev's FFN (ignored without prev).
    x, buffers, slots, mix, extra: prev's FFN input `[N, D]`, slot buffers,
      per-pair slots / mixing weights `[N, k]` and CPU output `[N, D]` (or None).
    ids: `[B, T]` token ids (embedding and scoring).
    inputs: the step's `AttentionInputs`.
    kvs: KV caches of the dense layers then (with a next layer) of next.
    state, sim: next's `CacheState` (or None) and similarity matrix (or None).
    costs, alpha, prior: cost model, substitution threshold, cache-prior strength.
    valid: `[N]` bool, real tokens.
  """
  kvs = list(kvs)
  if plan.has_prev:
    prov, h = ops.experts(h, x, buffers, slots, mix, extra)
  else:
    h = ops.embed(ids)
  for i in range(plan.n_dense):
    h, kvs[i] = ops.attend_dense(i, h, inputs, kvs[i])
  if not plan.has_next:
    return SegmentOut(h, None, None, kvs, None, None, None, ops.head(h, ids))
  prev_x = x
  # The paper's predictor: the next layer's attention and gate on the provisional output. Without CPU experts
  # or dense layers in between that is exactly the real next layer's input, so its real scores serve.
  reuse = extra is None and plan.n_dense == 0
  if plan.prefetch == "provisional" and not reuse:
    pred = ops.peek_scores(prov, inputs, kvs[-1])
  h, x, scores, kvs[-1] = ops.attend_route(h, inputs, kvs[-1])
  adm, prefetched = None, jnp.zeros(plan.config.num_experts, bool)
  if plan.prefetch is not None:
    if plan.prefetch == "provisional":
      pred = scores if reuse else pred
    elif plan.prefetch == "gate":
      pred = ops.gate_scores(prev_x)
    else:  # activation counts: no score prediction
      pred = jnp.zeros(scores.shape, jnp.float32)
    state, adm, prefetched = ops.prefetch(pred, valid, state, alpha)
  decision = ops.schedule(scores, valid, state, costs, alpha, sim, prefetched, prior)
  return SegmentOut(h, x, scores, kvs, decision, adm, ops.pack(decision, adm), None)


class InlineOps:
  """Stages called directly on modules (inside the fused jit)."""

  def __init__(self, plan: Plan, act: str, prev, dense, nxt, edges):
    self.plan, self.act = plan, act
    self.prev, self.dense, self.next, self.edges = prev, dense, nxt, edges

  def embed(self, ids):
    return _embed(None, self.edges, ids)

  def attend_dense(self, i, h, inputs, kv):
    return _attend_dense(None, self.dense[i], h, inputs, kv)

  def attend_route(self, h, inputs, kv):
    return _attend_route(None, self.next, h, inputs, kv)

  def peek_scores(self, h, inputs, kv):
    return _peek_scores(None, self.next, h, inputs, kv)

  def gate_scores(self, x):
    return _gate_scores(None, self.next, x)

  def experts(self, h, x, buffers, slots, mix, extra):
    return _experts(self.act, self.prev, h, x, buffers, slots, mix, extra)

  def schedule(self, scores, valid, state, costs, alpha, sim, prefetched, prior):
    p = self.plan
    return _schedule((p.config, p.spec, p.substitute_weight, p.exact), self.next, scores, valid, state, costs, alpha,
                     sim, prefetched, prior)

  def prefetch(self, pred, valid, state, alpha):
    return _prefetch((self.plan.config, self.plan.spec), self.next, pred, valid, state, alpha)

  def head(self, h, ids):
    return _head(self.plan.score, self.edges, h, ids)

  def pack(self, decision, adm):
    return pack_host(decision, adm)


class SegmentModules(NamedTuple):
  """The modules a segment reads, each as (ModuleDef, leaves) or None."""

  prev: tuple[ModuleDef, list] | None
  dense: tuple[tuple[ModuleDef, list], ...]
  next: tuple[ModuleDef, list] | None
  edges: tuple[ModuleDef, list] | None


def fused_segment(plan: Plan, act: str, defs: tuple) -> Callable:
  """`segment` as one jitted call: fn(leaves, h, x, ...) with `leaves` matching `defs` (prev, dense, next, edges).

  Not cached here: the engine keeps its own jitted functions, so that its
  compiled executables (and their code mappings) are freed with it.
  """
  prev_def, dense_defs, next_def, edges_def = defs

  def run(leaves, *args):
    prev_l, dense_l, next_l, edges_l = leaves
    ops = InlineOps(
        plan, act,
        None if prev_def is None else prev_def.build(prev_l),
        [d.build(l) for d, l in zip(dense_defs, dense_l)],
        None if next_def is None else next_def.build(next_l),
        None if edges_def is None else edges_def.build(edges_l),
    )
    return segment(ops, plan, *args)

  return jax.jit(run, donate_argnums=(9,))  # the segment's KV caches are updated in place


class StagedOps:
  """Stages as separate jitted calls on (ModuleDef, leaves); with `timer`, each is blocked on and timed.

  timer: None, or `timer(name, seconds)` receiving "attention", "experts",
  "plan", "prefetch" or "head" per stage.
  jits: the caller's dict of jitted stages (kept across segments and steps).
  """

  def __init__(self, plan: Plan, act: str, modules: SegmentModules, jits: dict, timer=None):
    self.plan, self.act, self.m, self.jits, self.timer = plan, act, modules, jits, timer

  def _call(self, name, fn, static, module, *args, donate=()):
    mdef, leaves = module
    t = time.perf_counter()
    key = (fn, static, mdef, donate)
    if key not in self.jits:
      self.jits[key] = jax.jit(lambda leaves, *a: fn(static, mdef.build(leaves), *a), donate_argnums=donate)
    out = self.jits[key](leaves, *args)
    if self.timer is not None:
      jax.block_until_ready(out)
      self.timer(name, time.perf_counter() - t)
    return out

  def embed(self, ids):
    return self._call("head", _embed, None, self.m.edges, ids)

  def attend_dense(self, i, h, inputs, kv):
    return self._call("attention", _attend_dense, None, self.m.dense[i], h, inputs, kv, donate=(3,))

  def attend_route(self, h, inputs, kv):
    return self._call("attention", _attend_route, None, self.m.next, h, inputs, kv, donate=(3,))

  def peek_scores(self, h, inputs, kv):
    return self._call("prefetch", _peek_scores, None, self.m.next, h, inputs, kv)

  def gate_scores(self, x):
    return self._call("prefetch", _gate_scores, None, self.m.next, x)

  def experts(self, h, x, buffers, slots, mix, extra):
    return self._call("experts", _experts, self.act, self.m.prev, h, x, buffers, slots, mix, extra)

  def schedule(self, scores, valid, state, costs, alpha, sim, prefetched, prior):
    p = self.plan
    return self._call("plan", _schedule, (p.config, p.spec, p.substitute_weight, p.exact), self.m.next, scores, valid,
                      state, costs, alpha, sim, prefetched, prior)

  def prefetch(self, pred, valid, state, alpha):
    return self._call("prefetch", _prefetch, (self.plan.config, self.plan.spec), self.m.next, pred, valid, state,
                      alpha)

  def head(self, h, ids):
    return self._call("head", _head, self.plan.score, self.m.edges, h, ids)

  def pack(self, decision, adm):
    t = time.perf_counter()
    out = _pack_jit(decision, adm)
    if self.timer is not None:
      self.timer("plan", time.perf_counter() - t)
    return out


_pack_jit = jax.jit(pack_host)
