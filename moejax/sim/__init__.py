"""Hardware profiles, the pipeline TPOT estimator (estimates, never measurements), and caching bounds.

- `trace`: `LayerEvent` / `StepTrace`, the per-step schedule the engine records,
  and their JSON form.
- `profiles`: named `HardwareProfile`s with the source of every number.
- `estimator`: `estimate_tpot(trace, profile)` replays a trace on a profile with
  the copy / CPU / GPU overlap of the offloading pipeline; `summarize` for JSON.
- `oracle`: `belady` / `substitution_bound` / `routing_bounds`, the most cache
  hits any schedule gets on a recorded routing trace.
"""

from moejax.sim.estimator import (
  Estimate,
  Interval,
  LayerTimeline,
  StepEstimate,
  estimate_tpot,
  summarize,
)
from moejax.sim.oracle import CacheBound, LayerRouting, belady, routing_bounds, substitution_bound
from moejax.sim.profiles import PROFILES, HardwareProfile, get_profile
from moejax.sim.trace import (
  LayerEvent,
  StepTrace,
  load_trace,
  save_trace,
  trace_from_json,
  trace_to_json,
)

__all__ = [
  "PROFILES",
  "CacheBound",
  "Estimate",
  "HardwareProfile",
  "Interval",
  "LayerEvent",
  "LayerRouting",
  "LayerTimeline",
  "StepEstimate",
  "StepTrace",
  "belady",
  "estimate_tpot",
  "get_profile",
  "load_trace",
  "routing_bounds",
  "save_trace",
  "substitution_bound",
  "summarize",
  "trace_from_json",
  "trace_to_json",
]
