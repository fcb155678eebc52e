"""Run statistics: counters per layer and step kind, step times, and the event trace."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from moejax.models.config import MoEConfig
from moejax.sim.trace import LayerEvent, StepTrace


class RunStats:
  """Accumulates what one `Engine.generate` call did.

  Counters are kept per step kind ("prefill", "decode") and per layer; the
  headline ratios (hit ratio, substitution rate) are over decode steps, the
  regime the method targets.
  """

  def __init__(self, config: MoEConfig, dtype_bytes: int):
    self.config = config
    self.dtype_bytes = dtype_bytes
    self.trace: list[StepTrace] = []
    self.step_s = collections.defaultdict(list)
    self.counts = {kind: collections.defaultdict(lambda: np.zeros(config.num_layers, np.int64))
                   for kind in ("prefill", "decode")}
    self.times = {kind: collections.defaultdict(float) for kind in ("prefill", "decode")}
    self._events: list[LayerEvent] = []
    self._kind = "prefill"
    self._tokens = 0
    self.routing: list[dict[int, np.ndarray]] = []  # per step: layer -> experts computed [N_valid, k]

  def begin_step(self, kind: str, tokens: int) -> None:
    self._kind, self._tokens, self._events = kind, tokens, []

  def add_layer_event(self, event: LayerEvent, *, bytes_to_device: int, counts: dict[str, int]) -> None:
    self._events.append(event)
    c = self.counts[self._kind]
    c["bytes_to_device"][event.layer] += bytes_to_device
    for name, value in counts.items():
      c[name][event.layer] += value
    for name, seconds in event.measured.items():
      self.times[self._kind][name] += seconds

  def record_routing(self, layer: int, experts: np.ndarray) -> None:
    """Keeps the experts computed per valid token `[N_valid, k]` of `layer` this step."""
    if len(self.routing) <= len(self.trace):
      self.routing.append({})
    self.routing[-1][layer] = experts

  def add_prefetch_bytes(self, layer: int, n: int) -> None:
    """Bytes copied by a prefetch for `layer`."""
    self.counts[self._kind]["prefetch_bytes"][layer] += n

  def add_time(self, name: str, seconds: float) -> None:
    """Adds measured seconds of a named stage to the current step kind."""
    self.times[self._kind][name] += seconds

  def end_step(self, wall_s: float, head_bytes: int) -> None:
    self.step_s[self._kind].append(wall_s)
    self.trace.append(StepTrace(
        step=len(self.trace), tokens=self._tokens, kind=self._kind, layers=tuple(self._events),
        head_bytes=head_bytes, wall_s=wall_s, dtype_bytes=self.dtype_bytes, hidden_size=self.config.hidden_size,
    ))

  def summary(self) -> dict[str, Any]:
    """Headline numbers plus per-layer arrays (decode steps unless named otherwise).

    tpot_s is the mean decode step time excluding the first decode step
    (which includes compilation when the host drives the steps) when there
    are at least two; a decode run on the device as one program shares its
    run time (compilation excluded) evenly among its steps; ttft_s is the
    prefill step time (including compilation on a cold engine); times_s holds
    the seconds measured per stage name over decode steps (stage timing needs
    `Engine(profile=True)`; copies and CPU work are timed when blocking anyway).
    """
    d = self.counts["decode"]
    total = lambda name: int(d[name].sum()) if name in d else 0
    decode = self.step_s["decode"]
    steady = decode[1:] if len(decode) > 1 else decode
    pairs = total("pairs")
    pairs_top = total("pairs_top")
    pairs_low = pairs - pairs_top
    prefetched = total("prefetched")
    out = {
        "tpot_s": float(np.mean(steady)) if steady else float("nan"),
        "ttft_s": float(self.step_s["prefill"][0]) if self.step_s["prefill"] else float("nan"),
        "decode_steps": len(decode),
        "hit_ratio": total("pairs_hit") / pairs if pairs else float("nan"),
        "hit_ratio_top": total("pairs_top_hit") / pairs_top if pairs_top else float("nan"),
        "hit_ratio_low": (total("pairs_hit") - total("pairs_top_hit")) / pairs_low if pairs_low else float("nan"),
        "substitution_rate": total("substituted") / pairs if pairs else float("nan"),
        "bytes_to_device": total("bytes_to_device") + total("prefetch_bytes"),
        "prefill_bytes_to_device": int(self.counts["prefill"]["bytes_to_device"].sum()),
        "cpu_experts": total("cpu_experts"),
        "cpu_pairs": total("cpu_pairs"),
        "demand_loads": total("demand_loads"),
        "prefetch_loads": prefetched,
        "prefetch_accuracy_top": total("prefetched_top") / prefetched if prefetched else float("nan"),
        "prefetch_accuracy_selected": total("prefetched_selected") / prefetched if prefetched else float("nan"),
        "times_s": dict(self.times["decode"]),
        "per_layer": {name: d[name].tolist() for name in sorted(d)},
    }
    return out
