"""What a run did: one counters type from the device program to the summary and the event trace.

The accounting (SPEC section 5b)
--------------------------------
Every valid (token, expert) pair a layer step computes is exactly one of:

- *resident*: its expert was on the device before the layer's prefetch and plan;
- *prefetch*: its expert arrived through a prefetch issued by the previous layer
  (whole-layer streaming, which copies every expert in ahead of the layer, counts here);
- *demand*: its expert was copied to the device after the plan, on the critical path;
- *cpu*: it was computed on the host.

`hit_ratio` = (resident + prefetch) / pairs, as the paper reports it;
`cache_hit_ratio` = resident / pairs. A substituted pair counts under the
class of the expert that actually ran (the substitution rate is separate).
Every copy counts its bytes once: demand loads, prefetches (used or not:
prefetched experts that the layer then does not compute are wasted bytes) and
streaming. The same counts, per distinct expert, feed the event trace of
`moejax.sim` (`layer_event`).

`LayerCounters` is produced inside the jitted step, one per MoE layer
(`moejax.engine.schedule`); a step stacks them `[L_moe]`, the on-device decode
loop `[steps, L_moe]`; `RunStats` sums them per decoder layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.config import MoEConfig
from moejax.sim.oracle import LayerRouting
from moejax.sim.trace import LayerEvent, StepTrace


class LayerCounters(NamedTuple):
  """Counts of one MoE layer step (int32 scalars; stacked on leading axes by steps and runs).

  Attributes:
    pairs: valid token-expert pairs computed.
    pairs_resident / pairs_prefetch / pairs_demand / pairs_cpu: the four
      classes of those pairs (see the module docstring); they sum to `pairs`.
    pairs_top: pairs holding a top-score expert (`S > (1 + alpha) S_(k+1)`).
    pairs_top_hit: of which resident or prefetched.
    substituted: pairs whose expert was substituted.
    resident_hits / prefetch_hits / demand_loads / cpu_experts: distinct
      experts computed in each class.
    prefetched: experts copied by the prefetch issued for this layer.
    prefetched_top / prefetched_selected: of which top-score / selected at
      all for some valid token (prefetch accuracy).
    streamed: experts copied by whole-layer streaming for this layer.
  """

  pairs: Any
  pairs_resident: Any
  pairs_prefetch: Any
  pairs_demand: Any
  pairs_cpu: Any
  pairs_top: Any
  pairs_top_hit: Any
  substituted: Any
  resident_hits: Any
  prefetch_hits: Any
  demand_loads: Any
  cpu_experts: Any
  prefetched: Any
  prefetched_top: Any
  prefetched_selected: Any
  streamed: Any

  @classmethod
  def stack(cls, items: list[LayerCounters]) -> LayerCounters:
    """One `LayerCounters` whose fields stack those of `items` on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *items)


class LayerFacts(NamedTuple):
  """What the event trace needs to know about the model and the policy, per decoder layer.

  dense_bytes / expert_bytes: the non-routed weights and one routed expert (0
  for a dense layer) as stored in the run; predictor_bytes / predictor: the
  weights read by, and the kind of, the prefetch predictor that runs during the
  layer for the next MoE layer (0 / "" without one); split: how the policy
  divides misses between loads and the CPU ("", "balance", "greedy");
  head_bytes: embedding row, final norm and LM head.
  """

  dense_bytes: tuple[int, ...]
  expert_bytes: tuple[int, ...]
  predictor_bytes: tuple[int, ...]
  predictor: tuple[str, ...]
  split: str
  head_bytes: int


def layer_event(
  layer: int, tokens: int, counts: LayerCounters, facts: LayerFacts, scheduled: bool, measured
) -> LayerEvent:
  """The trace event of one MoE layer step (host ints in `counts`), in `moejax.sim.trace`'s terms.

  The trace counts the experts of a streamed layer as `hits` copied by
  `layerwise_loads` (its estimator streams them one layer ahead). Steps that
  are not scheduled (exact) run no predictor and split nothing.
  """
  streamed = counts.streamed > 0
  return LayerEvent(
    layer=layer,
    tokens=tokens,
    dense_bytes=facts.dense_bytes[layer],
    expert_bytes=facts.expert_bytes[layer],
    hits=counts.prefetch_hits if streamed else counts.resident_hits,
    demand_loads=counts.demand_loads,
    prefetch_loads=0 if streamed else counts.prefetched,
    prefetch_used=0 if streamed else counts.prefetch_hits,
    cpu_experts=counts.cpu_experts,
    substituted=counts.substituted,
    layerwise_loads=counts.streamed,
    predictor_bytes=facts.predictor_bytes[layer] if scheduled else 0,
    predictor=facts.predictor[layer] if scheduled else "",
    split=facts.split if scheduled else "",
    gpu_pairs=counts.pairs - counts.pairs_cpu,
    demand_pairs=counts.pairs_demand,
    cpu_pairs=counts.pairs_cpu,
    measured=measured,
  )


class StepSummary(NamedTuple):
  """One step as `RunStats` records it: its kind ("prefill" / "decode"), valid tokens, wall seconds, and
  whether the policy scheduled it (False: an exact step, every expert streamed in)."""

  kind: str
  tokens: int
  wall_s: float
  scheduled: bool


class RunStats:
  """Accumulates what one or more `Engine` calls did.

  Counters are summed per step kind ("prefill", "decode") and per decoder
  layer (`[num_layers]` arrays, zeros for dense layers); the headline ratios
  are over decode steps, the regime the method targets.

  Attributes:
    trace: per step a `StepTrace` (the estimator's input).
    routing: per step, with routing recorded, {MoE layer: `LayerRouting`}.
    decode_starts: with routing recorded, per call that decodes, (index of
      its first decode step in `routing`, the experts its slots held then:
      {MoE layer: experts} for per-layer slots, or the keys of a shared pool).
    step_s: per kind, each step's wall seconds.
    totals: per kind, a `LayerCounters` of `[num_layers]` int64 arrays.
    times: per kind, seconds measured per stage name (profile mode).
  """

  def __init__(self, config: MoEConfig, facts: LayerFacts, dtype_bytes: int):
    self.config, self.facts, self.dtype_bytes = config, facts, dtype_bytes
    self.trace: list[StepTrace] = []
    self.routing: list[dict[int, LayerRouting]] = []
    self.decode_starts: list[tuple[int, Any]] = []
    self.step_s: dict[str, list[float]] = {"prefill": [], "decode": []}
    zeros = LayerCounters(*(np.zeros(config.num_layers, np.int64) for _ in LayerCounters._fields))
    self.totals = {"prefill": zeros, "decode": zeros}
    self.times: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}

  def record_step(
    self,
    step: StepSummary,
    counters: LayerCounters,
    routing: dict[int, LayerRouting] | None = None,
    measured: dict | None = None,
  ) -> None:
    """Adds one step: `counters` with `[L_moe]` host arrays (MoE layers in order); `routing` when recorded;
    `measured`: seconds per stage name, keyed by decoder layer (None: embedding and head)."""
    kind, tokens = step.kind, step.tokens
    measured = measured or {}
    moe_ids = self.config.moe_layer_ids
    self.totals[kind] = LayerCounters(
      *(
        total + np.bincount(moe_ids, weights=np.asarray(c, np.int64), minlength=self.config.num_layers).astype(np.int64)
        for total, c in zip(self.totals[kind], counters)
      )
    )
    events = []
    per_moe = {l: LayerCounters(*(int(c[j]) for c in counters)) for j, l in enumerate(moe_ids)}
    for l in range(self.config.num_layers):
      times = dict(measured.get(l, {}))
      if l in per_moe:
        events.append(layer_event(l, tokens, per_moe[l], self.facts, step.scheduled, times))
      else:
        events.append(
          LayerEvent(layer=l, tokens=tokens, dense_bytes=self.facts.dense_bytes[l], expert_bytes=0, measured=times)
        )
    for stages in measured.values():
      for name, seconds in stages.items():
        self.times[kind][name] = self.times[kind].get(name, 0.0) + seconds
    if routing is not None:
      self.routing.append(routing)
    self.step_s[kind].append(step.wall_s)
    self.trace.append(
      StepTrace(
        step=len(self.trace),
        tokens=tokens,
        kind=kind,
        layers=tuple(events),
        head_bytes=self.facts.head_bytes,
        wall_s=step.wall_s,
        dtype_bytes=self.dtype_bytes,
        hidden_size=self.config.hidden_size,
      )
    )

  def record_decode_start(self, resident) -> None:
    """Marks that the next recorded step starts a decode whose slots hold `resident` (see `decode_starts`)."""
    self.decode_starts.append((len(self.routing), resident))

  def per_layer(self, kind: str = "decode") -> dict[str, list[int]]:
    """Every counter and the copied bytes, per decoder layer, summed over steps of `kind`."""
    t = self.totals[kind]
    expert = np.asarray(self.facts.expert_bytes, np.int64)
    out = {name: getattr(t, name).tolist() for name in LayerCounters._fields}
    out["bytes_to_device"] = ((t.demand_loads + t.prefetched + t.streamed) * expert).tolist()
    out["prefetch_bytes"] = (t.prefetched * expert).tolist()
    # Copied ahead of the layer (by its predictor, or by streaming the whole layer) and then not computed.
    out["wasted_prefetch_bytes"] = ((t.prefetched + t.streamed - t.prefetch_hits) * expert).tolist()
    return out

  def summary(self) -> dict[str, Any]:
    """Headline numbers plus per-layer lists (decode steps unless named otherwise).

    tpot_s is the mean decode step time excluding the first decode step
    (which includes compilation when the host drives the steps) when there
    are at least two; a decode run on the device as one program shares its
    run time (compilation excluded) evenly among its steps; ttft_s is the
    prefill step time (including compilation on a cold engine); times_s holds
    the seconds measured per stage name over decode steps (`Engine(profile=True)`).
    """
    t = jax.tree.map(lambda a: int(a.sum()), self.totals["decode"])
    per_layer = self.per_layer("decode")
    decode = self.step_s["decode"]
    steady = decode[1:] if len(decode) > 1 else decode
    ratio = lambda a, b: a / b if b else float("nan")
    hits = t.pairs_resident + t.pairs_prefetch
    pairs_low = t.pairs - t.pairs_top
    return {
      "tpot_s": float(np.mean(steady)) if steady else float("nan"),
      "ttft_s": float(self.step_s["prefill"][0]) if self.step_s["prefill"] else float("nan"),
      "decode_steps": len(decode),
      "pairs": t.pairs,
      "pair_classes": {
        "resident": t.pairs_resident,
        "prefetch": t.pairs_prefetch,
        "demand": t.pairs_demand,
        "cpu": t.pairs_cpu,
      },
      "hit_ratio": ratio(hits, t.pairs),
      "cache_hit_ratio": ratio(t.pairs_resident, t.pairs),
      "hit_ratio_top": ratio(t.pairs_top_hit, t.pairs_top),
      "hit_ratio_low": ratio(hits - t.pairs_top_hit, pairs_low),
      "substitution_rate": ratio(t.substituted, t.pairs),
      "bytes_to_device": sum(per_layer["bytes_to_device"]),
      "prefetch_bytes": sum(per_layer["prefetch_bytes"]),
      "wasted_prefetch_bytes": sum(per_layer["wasted_prefetch_bytes"]),
      "prefill_bytes_to_device": sum(self.per_layer("prefill")["bytes_to_device"]),
      "cpu_experts": t.cpu_experts,
      "cpu_pairs": t.pairs_cpu,
      "demand_loads": t.demand_loads,
      "prefetch_loads": t.prefetched,
      "prefetch_hits": t.prefetch_hits,
      "prefetch_accuracy_top": ratio(t.prefetched_top, t.prefetched),
      "prefetch_accuracy_selected": ratio(t.prefetched_selected, t.prefetched),
      "times_s": dict(self.times["decode"]),
      "per_layer": per_layer,
    }
