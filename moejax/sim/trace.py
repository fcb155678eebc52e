"""Per-step event traces: the exact schedule a real run produced.

The engine records, for every forward step (one prefill chunk or one decode
step of the whole batch), one `StepTrace` holding one `LayerEvent` per decoder
layer, in execution order. `moejax.sim.estimator` replays these records on a
named `HardwareProfile` to estimate TPOT/TTFT on hardware we do not have.

Counting rules for one layer (the engine must follow them exactly)
--------------------------------------------------------------------
The routed experts *computed on the device* in a layer are split into three
disjoint groups; each computed expert is counted in exactly one of them, once
per layer (distinct experts, not token-expert pairs). They are the classes of
SPEC section 5b:

- `hits` (resident hits): resident before this layer's prefetch and plan,
  i.e. not brought by the prefetch issued for this layer. Under layerwise
  streaming the computed experts of the streamed layer are `hits` (they were
  copied in before the plan).
- `prefetch_used` (prefetch hits): arrived through the prefetch issued for
  this layer by the previous MoE layer, and computed.
- `demand_loads`: copied host->device after the plan, on the critical path.
  Every demand-loaded expert is computed on the device.

Other counts:

- `prefetch_loads`: experts copied for this layer by the prefetch issued
  during the previous MoE layer (used or not; `prefetch_used <=
  prefetch_loads`; the difference is wasted copies). A prefetch for the
  first MoE layer of a step (if any) is taken as issued at the step start.
- `layerwise_loads`: experts copied by whole-layer streaming for this layer
  (issued at the start of the previous layer); 0 for other policies.
- `cpu_experts`: distinct experts computed on the host CPU in this layer.
- `substituted`: token-expert pairs whose expert was replaced by a resident
  substitute (statistic only; it costs nothing beyond the substitute's compute,
  which is already counted in the groups above).

How the layer was scheduled:

- `predictor`: the prefetch predictor that runs during this layer for the
  next MoE layer (SPEC section 5): "" none; "provisional" (the paper's: the
  provisional output from the shared experts and this layer's resident
  experts, `hits` + `prefetch_used`, then the next layer's attention and gate;
  it can start only once those experts are done); "gate" (the next layer's
  gate on this layer's MoE input, ready at plan time); "layernorm" (the
  released code's: norms and the next gate on the MoE input plus the shared
  experts' output; its prefetch is issued only once this layer's demand loads
  and CPU work are done); "activation" (from activation counts: no device
  work, issued at plan time).
- `split`: how this layer's misses were divided between demand loads and
  the CPU: "" fixed by the policy; "balance" (SPEC section 6 two-pointer
  rule); "greedy" (the released code's CPU-first rule). The estimator
  recomputes a "balance"/"greedy" split with the target hardware's costs.

Byte counts are the bytes of the weights *as stored in this run* (so a
float32 run records float32 bytes; `StepTrace.dtype_bytes` says which):

- `dense_bytes`: non-routed weight bytes read on the device for this layer:
  attention (incl. projections), norms, router, shared experts or dense MLP.
- `expert_bytes`: bytes of ONE routed expert of this layer (all its matrices);
  0 for a dense layer.
- `predictor_bytes`: extra weight bytes read on the device by this layer's
  predictor: the next layer's attention and gate ("provisional"), its router
  ("gate"), its norms and router ("layernorm"); 0 for "activation" and "".
- `StepTrace.head_bytes`: embedding rows read + final norm + lm head bytes.

Optional refinements (None = unknown; the estimator then assumes every
computed expert processes every token of the step, exact for batch-1 decode):

- `gpu_pairs`: token-expert pairs computed by device experts (sum over the
  computed experts of the number of tokens routed to each).
- `demand_pairs`: of those, the pairs computed by demand-loaded experts.
- `cpu_pairs`: the same for CPU experts.

`measured` holds optional wall-clock seconds measured on the machine that ran
(keys such as "attention", "plan", "copy", "experts", "cpu"). The estimator
only reports them next to its estimate; it never uses them.

JSON: `trace_to_json` / `trace_from_json` convert to and from plain lists of
dicts; `save_trace` / `load_trace` write and read a versioned JSON file.
Version 1 files (before `predictor`, `split` and `demand_pairs`) still load:
the new fields take their defaults, except that a version 1 layer with
`predictor_bytes > 0` gets `predictor="provisional"`, the only predictor the
version 1 engine charged bytes for.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any

STEP_KINDS = ("prefill", "decode")
TRACE_FORMAT = "moejax.sim.trace"
TRACE_VERSION = 2
PREDICTORS = ("", "provisional", "gate", "layernorm", "activation")
SPLITS = ("", "balance", "greedy")
_DEVICE_PREDICTORS = ("provisional", "gate", "layernorm")  # the ones that read weights on the device

_LAYER_COUNTS = (
  "layer",
  "tokens",
  "dense_bytes",
  "expert_bytes",
  "hits",
  "demand_loads",
  "prefetch_loads",
  "prefetch_used",
  "cpu_experts",
  "substituted",
  "layerwise_loads",
  "predictor_bytes",
)
_LAYER_PAIRS = ("gpu_pairs", "demand_pairs", "cpu_pairs")


def _as_count(value: Any, name: str, owner: str) -> int:
  """Python int >= 0 from an int-like value (numpy ints are accepted)."""
  try:
    out = operator.index(value)
  except TypeError:
    raise TypeError(f"{owner}.{name} must be an integer, got {type(value).__name__} {value!r}") from None
  if out < 0:
    raise ValueError(f"{owner}.{name} must be >= 0, got {out}")
  return int(out)


def _as_seconds(value: Any, name: str, owner: str) -> float:
  out = float(value)
  if not math.isfinite(out) or out < 0:
    raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")
  return out


@dataclasses.dataclass(frozen=True)
class LayerEvent:
  """What one decoder layer did in one step. See the module docstring.

  Attributes:
    layer: decoder layer index.
    tokens: valid tokens computed this step (batch size for decode, chunk
      length for prefill).
    dense_bytes: non-routed weight bytes read on the device for this layer.
    expert_bytes: bytes of one routed expert of this layer (0 if dense layer).
    hits: resident hits: computed device experts resident before this layer's
      prefetch and plan.
    demand_loads: experts copied host->device after the plan (critical path).
    prefetch_loads: experts copied for this layer by the prefetch issued
      during the previous MoE layer.
    prefetch_used: prefetch hits: of those, the ones computed.
    cpu_experts: experts computed on the host CPU.
    substituted: token-expert pairs substituted (statistic only).
    layerwise_loads: whole-layer streaming copies for this layer.
    predictor_bytes: weight bytes read by this layer's prefetch predictor.
    predictor: the predictor run in this layer for the next MoE layer, one of
      `PREDICTORS` ("" none).
    split: how the misses were split between loads and the CPU, one of
      `SPLITS` ("" fixed by the policy).
    gpu_pairs: token-expert pairs computed on the device (None = unknown).
    demand_pairs: of those, the pairs of demand-loaded experts (None =
      unknown).
    cpu_pairs: token-expert pairs computed on the CPU (None = unknown).
    measured: optional measured wall-clock seconds by phase name.
  """

  layer: int
  tokens: int
  dense_bytes: int
  expert_bytes: int
  hits: int = 0
  demand_loads: int = 0
  prefetch_loads: int = 0
  prefetch_used: int = 0
  cpu_experts: int = 0
  substituted: int = 0
  layerwise_loads: int = 0
  predictor_bytes: int = 0
  predictor: str = ""
  split: str = ""
  gpu_pairs: int | None = None
  demand_pairs: int | None = None
  cpu_pairs: int | None = None
  measured: Mapping[str, float] = dataclasses.field(default_factory=dict, hash=False)

  def __post_init__(self):
    for name in _LAYER_COUNTS:
      object.__setattr__(self, name, _as_count(getattr(self, name), name, "LayerEvent"))
    for name in _LAYER_PAIRS:
      if getattr(self, name) is not None:
        object.__setattr__(self, name, _as_count(getattr(self, name), name, "LayerEvent"))
    where = f"LayerEvent(layer={self.layer})"
    if self.predictor not in PREDICTORS:
      raise ValueError(f"{where}: predictor must be one of {PREDICTORS}, got {self.predictor!r}")
    if self.split not in SPLITS:
      raise ValueError(f"{where}: split must be one of {SPLITS}, got {self.split!r}")
    if self.predictor_bytes and self.predictor not in _DEVICE_PREDICTORS:
      raise ValueError(
        f"{where}: predictor_bytes={self.predictor_bytes} but predictor={self.predictor!r} reads no weights; "
        f"name the predictor that reads them (one of {_DEVICE_PREDICTORS}) or record 0 bytes"
      )
    if self.prefetch_used > self.prefetch_loads:
      raise ValueError(
        f"LayerEvent(layer={self.layer}): prefetch_used={self.prefetch_used} > "
        f"prefetch_loads={self.prefetch_loads}; only prefetched experts can be used"
      )
    if self.gpu_pairs is not None and self.gpu_pairs > self.tokens * self.gpu_experts:
      raise ValueError(
        f"LayerEvent(layer={self.layer}): gpu_pairs={self.gpu_pairs} exceeds "
        f"tokens * (hits + demand_loads + prefetch_used) = {self.tokens * self.gpu_experts}"
      )
    if self.demand_pairs is not None:
      resident = None if self.gpu_pairs is None else self.gpu_pairs - self.demand_pairs
      if self.demand_pairs > self.tokens * self.demand_loads or (
        resident is not None and not 0 <= resident <= self.tokens * self.resident_experts
      ):
        raise ValueError(
          f"{where}: demand_pairs={self.demand_pairs} must be at most tokens * demand_loads = "
          f"{self.tokens * self.demand_loads} and leave gpu_pairs - demand_pairs between 0 and "
          f"tokens * (hits + prefetch_used) = {self.tokens * self.resident_experts} (gpu_pairs={self.gpu_pairs})"
        )
    if self.cpu_pairs is not None and self.cpu_pairs > self.tokens * self.cpu_experts:
      raise ValueError(
        f"LayerEvent(layer={self.layer}): cpu_pairs={self.cpu_pairs} exceeds "
        f"tokens * cpu_experts = {self.tokens * self.cpu_experts}"
      )
    measured = {str(k): _as_seconds(v, f"measured[{k!r}]", "LayerEvent") for k, v in dict(self.measured).items()}
    object.__setattr__(self, "measured", measured)

  @property
  def gpu_experts(self) -> int:
    """Distinct routed experts computed on the device: hits + demand + prefetch_used."""
    return self.hits + self.demand_loads + self.prefetch_used

  @property
  def resident_experts(self) -> int:
    """Device experts that need no copy after the plan: hits + prefetch_used."""
    return self.hits + self.prefetch_used

  @property
  def wasted_prefetch(self) -> int:
    """Experts prefetched for this layer and not computed."""
    return self.prefetch_loads - self.prefetch_used

  @property
  def copied_experts(self) -> int:
    """Experts copied host->device for this layer (demand + prefetch + layerwise)."""
    return self.demand_loads + self.prefetch_loads + self.layerwise_loads

  @property
  def copied_bytes(self) -> int:
    """Weight bytes copied host->device for this layer, as stored in the run."""
    return self.copied_experts * self.expert_bytes


@dataclasses.dataclass(frozen=True)
class StepTrace:
  """One forward step (prefill chunk or decode step of the batch).

  Attributes:
    step: step index in the run.
    tokens: valid tokens computed this step (decode: number of sequences, each
      gets one new token; prefill: prompt tokens in this chunk).
    kind: "prefill" or "decode".
    layers: one LayerEvent per decoder layer, in execution order.
    head_bytes: embedding rows + final norm + lm head weight bytes read.
    wall_s: measured wall-clock seconds of the step on the machine that ran.
    dtype_bytes: bytes per weight element of the run (4 for float32, 2 for
      bfloat16/float16); converts the byte counts to parameter counts.
    hidden_size: model hidden size; sizes the activations moved to and from
      the CPU for CPU-computed experts (tokens * hidden_size * dtype_bytes).
  """

  step: int
  tokens: int
  kind: str
  layers: tuple[LayerEvent, ...]
  head_bytes: int
  wall_s: float
  dtype_bytes: int
  hidden_size: int

  def __post_init__(self):
    for name in ("step", "tokens", "head_bytes", "dtype_bytes", "hidden_size"):
      object.__setattr__(self, name, _as_count(getattr(self, name), name, "StepTrace"))
    object.__setattr__(self, "wall_s", _as_seconds(self.wall_s, "wall_s", "StepTrace"))
    if self.kind not in STEP_KINDS:
      raise ValueError(f"StepTrace.kind must be one of {STEP_KINDS}, got {self.kind!r}")
    if self.dtype_bytes == 0:
      raise ValueError("StepTrace.dtype_bytes must be > 0 (4 for float32, 2 for bf16)")
    layers = tuple(self.layers)
    for ev in layers:
      if not isinstance(ev, LayerEvent):
        raise TypeError(f"StepTrace.layers must hold LayerEvent, got {type(ev).__name__}")
    idx = [ev.layer for ev in layers]
    if any(b <= a for a, b in itertools.pairwise(idx)):
      raise ValueError(f"StepTrace(step={self.step}).layers must be in increasing layer order, got {idx}")
    object.__setattr__(self, "layers", layers)


_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerEvent))
_STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepTrace))
_V1_LAYER_FIELDS = tuple(name for name in _LAYER_FIELDS if name not in ("predictor", "split", "demand_pairs"))


def _layer_to_dict(ev: LayerEvent) -> dict[str, Any]:
  d = {name: getattr(ev, name) for name in _LAYER_FIELDS}
  d["measured"] = dict(ev.measured)
  return d


def trace_to_json(trace: Sequence[StepTrace]) -> list[dict[str, Any]]:
  """Plain JSON-serialisable form of a trace: one dict per step."""
  out = []
  for st in trace:
    d = {name: getattr(st, name) for name in _STEP_FIELDS}
    d["layers"] = [_layer_to_dict(ev) for ev in st.layers]
    out.append(d)
  return out


def _check_keys(d: Mapping[str, Any], allowed: tuple[str, ...], what: str):
  unknown = sorted(set(d) - set(allowed))
  if unknown:
    raise ValueError(f"{what}: unknown keys {unknown}; expected a subset of {list(allowed)}")


def trace_from_json(data: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[StepTrace]:
  """Inverse of `trace_to_json`. Also accepts the dict written by `save_trace`, of this or an earlier
  version (see the module docstring); a bare list is read as the current version."""
  version = TRACE_VERSION
  if isinstance(data, Mapping):
    if data.get("format") != TRACE_FORMAT:
      raise ValueError(f"not a {TRACE_FORMAT} document (format={data.get('format')!r})")
    version = data.get("version")
    if version not in (1, TRACE_VERSION):
      raise ValueError(f"unsupported trace version {version!r}; this reader knows 1 and {TRACE_VERSION}")
    data = data["steps"]
  allowed = _LAYER_FIELDS if version == TRACE_VERSION else _V1_LAYER_FIELDS
  steps = []
  for i, sd in enumerate(data):
    _check_keys(sd, _STEP_FIELDS, f"step #{i}")
    sd = dict(sd)
    layers = []
    for ld in sd.pop("layers", ()):
      _check_keys(ld, allowed, f"step #{i} layer")
      if version == 1 and ld.get("predictor_bytes"):
        ld = dict(ld, predictor="provisional")
      layers.append(LayerEvent(**ld))
    steps.append(StepTrace(layers=tuple(layers), **sd))
  return steps


def save_trace(path: str | os.PathLike, trace: Sequence[StepTrace]) -> None:
  """Write a trace as a versioned JSON document."""
  doc = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "steps": trace_to_json(trace)}
  with open(path, "w") as f:
    json.dump(doc, f)


def load_trace(path: str | os.PathLike) -> list[StepTrace]:
  """Read a trace written by `save_trace` (or a bare `trace_to_json` list)."""
  with open(path) as f:
    return trace_from_json(json.load(f))
