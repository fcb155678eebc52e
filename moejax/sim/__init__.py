"""Hardware profiles and the pipeline TPOT estimator (estimates, never measurements).

- `trace`: `LayerEvent` / `StepTrace`, the per-step schedule the engine records,
  and their JSON form.
- `profiles`: named `HardwareProfile`s with the source of every number.
- `estimator`: `estimate_tpot(trace, profile)` replays a trace on a profile with
  the copy / CPU / GPU overlap of the offloading pipeline; `summarize` for JSON.
"""

from moejax.sim.estimator import (
    Estimate,
    Interval,
    LayerTimeline,
    StepEstimate,
    estimate_tpot,
    summarize,
)
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
    "Estimate",
    "HardwareProfile",
    "Interval",
    "LayerEvent",
    "LayerTimeline",
    "PROFILES",
    "StepEstimate",
    "StepTrace",
    "estimate_tpot",
    "get_profile",
    "load_trace",
    "save_trace",
    "summarize",
    "trace_from_json",
    "trace_to_json",
]
