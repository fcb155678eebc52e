"""Pipeline TPOT/TTFT estimator: replay a run's trace on a hardware profile.

On a machine without an accelerator, wall-clock TPOT measures only our own
overheads. This module replays the exact per-step schedule a run recorded
(`moejax.sim.trace.StepTrace`) on a `HardwareProfile` and returns an
`Estimate`, always labelled `label == "estimate"`.

The pipeline model
==================

Three resources, each doing one thing at a time: the GPU (one stream), the
host->device link (copies are serialised, first issued first served), and
the CPU (expert matmuls use all cores, one expert batch after another).
Every step is simulated on its own, starting at t = 0 with all three idle;
steps do not overlap (each decode step needs the previous token).

Notation for one layer event `ev` of a step with `dtype_bytes` = b and
`scale` = target_dtype_bytes / b (1 unless `target_dtype_bytes` is given;
all weight byte counts are multiplied by it, parameter counts are not):

    gpu(B, F)      = max(B * scale / gpu_mem_bw, F / gpu_flops)   [roofline]
    params(B)      = B / b            (parameters of a weight block of B bytes)
    copy(n)        = link_latency_s + n * expert_bytes * scale / link_bw
    act            = tokens * hidden_size * (target_dtype_bytes or b)  [bytes]
    n_gpu          = hits + demand_loads + prefetch_used
    gpu_pairs      = ev.gpu_pairs, or tokens * n_gpu if unknown
    cpu_pairs      = ev.cpu_pairs, or tokens * cpu_experts if unknown

GPU work of layer l (serial, in this order):

    attention  = gpu(dense_bytes, 2 * tokens * params(dense_bytes)) + kernel_overhead_s
                 (attention, norms, router, shared experts / dense MLP;
                 the plan is ready when it ends)
    predictor  = gpu(predictor_bytes, 2 * tokens * params(predictor_bytes))
                 + kernel_overhead_s, only if predictor_bytes > 0
    experts    = gpu(n_gpu * expert_bytes, 2 * gpu_pairs * params(expert_bytes))

FLOP approximation: a matmul with P weights applied to T tokens costs 2*T*P
FLOPs, so a weight block of B bytes costs 2 * tokens * B / b. This ignores the
attention score/value products (2 * tokens * context * heads * head_dim,
relevant only at long context), norms and activations, and, when
`gpu_pairs`/`cpu_pairs` are not recorded, assumes every computed expert sees
every token of the step (exact for batch-1 decode, an over-estimate for
prefill and batched decode). Since both roofline terms are linear in the
bytes for a fixed token count, summing the attention and expert phases
equals the single-roofline formula
max(bytes / gpu_mem_bw, flops / gpu_flops) + kernel_overhead_s over the
whole layer whenever the pairs are unknown.

Copies (each kind of copy for one layer is one transfer batch, costing
`copy(n)`; a batch starts at max(issue time, link free)):

- layerwise loads for layer l are issued when layer l-1 starts (its
  attention start), i.e. streamed one layer ahead; layer 0's at t = 0.
- demand loads for layer l are issued when layer l's plan is ready (end of
  its attention).
- prefetch loads for layer l are issued when layer l-1's attention (and its
  predictor, if any) is done, so they overlap the rest of layer l-1 and the
  attention of layer l; a prefetch for layer 0 is issued at t = 0.
- the CPU result of layer l (act bytes) goes host->device on the same link
  when the CPU finishes: latency + act / link_bw.

The link serves copies in issue-time order; copies issued at the same time
queue as layerwise(l+1), demand(l), CPU result(l), prefetch(l+1).

Layer l's expert phase starts at
max(end of attention/predictor, end of the demand batch of l if any, end of
the prefetch batch for l if prefetch_used > 0, end of the layerwise batch for
l if any and n_gpu > 0). Unused prefetches cost link time only (they can
delay later copies). The gap between the end of attention/predictor and the
expert start is the layer's copy stall.

CPU experts of layer l: the activations go device->host (latency +
act / link_bw; the other link direction, so not queued behind host->device
copies; skipped when act = 0), then the CPU computes

    cpu = max(cpu_experts * expert_bytes * scale / cpu_mem_bw,
              2 * cpu_pairs * params(expert_bytes) / cpu_flops)

(= cpu_experts * max(per-expert bytes / cpu_mem_bw, per-expert flops /
cpu_flops) when the pairs are unknown), overlapping the copies and the GPU
expert phase. The CPU sums its experts' weighted outputs, so one act-sized
result is copied back (skipped when act = 0).

Layer l ends at max(end of its GPU expert phase, end of its CPU result
copy); layer l+1 starts then (its attention needs layer l's output). After
the last layer the head runs on the GPU:
gpu(head_bytes, 2 * tokens * params(head_bytes)) + kernel_overhead_s
(embedding rows, final norm, lm head; the embedding lookup is accounted at
the end, which changes no total). The step time is the head's end.

Reported numbers
================

- `tpot_s`: mean estimated time of the decode steps (the time between two
  tokens of a sequence; a decode step of a batch of B sequences gives each
  sequence one token). None when the trace has no decode step.
- `ttft_s`: mean over prefills of the estimated prefill time, where a prefill
  is a maximal run of consecutive prefill steps (chunks); None if none.
- per step (`StepEstimate`) and per layer (`LayerTimeline`): gpu_s (GPU busy),
  link_s (transfers serving this layer, both directions), cpu_s (CPU busy),
  stall_s = copy_stall_s + cpu_wait_s, where cpu_wait_s is the time the layer
  end waits for the CPU path after the GPU experts are done. For every layer,
  end - start == gpu_s + stall_s exactly.
- `Estimate.layer_breakdown(kind)`: per-layer-index means over steps.
- `summarize(estimate)`: a JSON-ready dict.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Mapping, NamedTuple, Sequence

from moejax.sim.profiles import HardwareProfile, get_profile
from moejax.sim.trace import LayerEvent, StepTrace

LABEL = "estimate"


class Interval(NamedTuple):
  """A busy interval [start, end) in seconds from the start of the step."""

  start: float
  end: float

  @property
  def duration(self) -> float:
    return self.end - self.start


def _iv(x: Interval | None) -> list[float] | None:
  return None if x is None else [x.start, x.end]


@dataclasses.dataclass(frozen=True)
class LayerTimeline:
  """When each part of one layer ran (seconds from the start of the step).

  Intervals are None when that part did not happen. `prefetch_copy` and
  `layerwise_copy` are the copies *for* this layer (issued during the
  previous layer); `experts` may have zero length (no device experts).
  """

  layer: int
  start: float
  end: float
  attention: Interval
  predictor: Interval | None
  layerwise_copy: Interval | None
  prefetch_copy: Interval | None
  demand_copy: Interval | None
  cpu_input: Interval | None
  cpu: Interval | None
  cpu_output: Interval | None
  experts: Interval
  gpu_s: float
  link_s: float
  cpu_s: float
  copy_stall_s: float
  cpu_wait_s: float

  @property
  def stall_s(self) -> float:
    """GPU idle time inside the layer (waiting for copies or for the CPU)."""
    return self.copy_stall_s + self.cpu_wait_s

  @property
  def time_s(self) -> float:
    return self.end - self.start

  def to_dict(self) -> dict[str, Any]:
    d = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      d[f.name] = _iv(v) if isinstance(v, Interval) else v
    d["stall_s"] = self.stall_s
    return d


@dataclasses.dataclass(frozen=True)
class StepEstimate:
  """Estimated timeline of one step."""

  step: int
  kind: str
  tokens: int
  time_s: float
  layers: tuple[LayerTimeline, ...]
  head: Interval
  gpu_s: float
  link_s: float
  cpu_s: float
  stall_s: float
  wall_s: float
  measured: Mapping[str, float]

  def to_dict(self, timelines: bool = False) -> dict[str, Any]:
    d = {
        "step": self.step,
        "kind": self.kind,
        "tokens": self.tokens,
        "time_s": self.time_s,
        "gpu_s": self.gpu_s,
        "link_s": self.link_s,
        "cpu_s": self.cpu_s,
        "stall_s": self.stall_s,
        "wall_s": self.wall_s,
        "measured": dict(self.measured),
    }
    if timelines:
      d["head"] = _iv(self.head)
      d["layers"] = [lt.to_dict() for lt in self.layers]
    return d


@dataclasses.dataclass(frozen=True)
class Estimate:
  """TPOT/TTFT estimated for one profile. `label` is always "estimate".

  `profile` is the profile's name, `hardware` the profile itself (numbers and
  sources), `steps` the per-step timelines in trace order.
  """

  profile: str
  tpot_s: float | None
  ttft_s: float | None
  decode_tokens_per_s: float | None
  steps: tuple[StepEstimate, ...]
  dtype_bytes: int | None
  target_dtype_bytes: int | None
  hardware: HardwareProfile
  label: str = dataclasses.field(default=LABEL, init=False)

  def layer_breakdown(self, kind: str = "decode") -> list[dict[str, float]]:
    """Per layer index, the mean over steps of `kind` of time/gpu/link/cpu/stall seconds."""
    by_layer: dict[int, list[LayerTimeline]] = {}
    for st in self.steps:
      if st.kind == kind:
        for lt in st.layers:
          by_layer.setdefault(lt.layer, []).append(lt)
    out = []
    for layer in sorted(by_layer):
      lts = by_layer[layer]
      row = {"layer": layer, "steps": len(lts)}
      for key in ("time_s", "gpu_s", "link_s", "cpu_s", "stall_s", "copy_stall_s", "cpu_wait_s"):
        row[key] = statistics.fmean(getattr(lt, key) for lt in lts)
      out.append(row)
    return out


def _gpu_time(prof: HardwareProfile, nbytes: float, flops: float) -> float:
  return max(nbytes / prof.gpu_mem_bw, flops / prof.gpu_flops)


def _estimate_step(st: StepTrace, prof: HardwareProfile, dtype_bytes: int,
                   target_dtype_bytes: int | None) -> StepEstimate:
  """Simulate one step from t = 0; see the module docstring for the rules."""
  scale = 1.0 if target_dtype_bytes is None else target_dtype_bytes / dtype_bytes
  act_width = st.hidden_size * (target_dtype_bytes or dtype_bytes)  # bytes per token
  layers = st.layers
  n = len(layers)

  link_free = 0.0

  def h2d(issue: float, nbytes: float) -> Interval:
    nonlocal link_free
    start = max(issue, link_free)
    link_free = start + prof.link_latency_s + nbytes / prof.link_bw
    return Interval(start, link_free)

  def batch_bytes(ev: LayerEvent, count: int) -> float:
    return count * ev.expert_bytes * scale

  def dense_gpu(nbytes: int, tokens: int) -> float:
    return _gpu_time(prof, nbytes * scale, 2.0 * tokens * nbytes / dtype_bytes)

  layerwise = [None] * n
  prefetch = [None] * n
  if n:
    if layers[0].layerwise_loads:
      layerwise[0] = h2d(0.0, batch_bytes(layers[0], layers[0].layerwise_loads))
    if layers[0].prefetch_loads:
      prefetch[0] = h2d(0.0, batch_bytes(layers[0], layers[0].prefetch_loads))

  t = 0.0
  cpu_free = 0.0
  timelines = []
  measured: dict[str, float] = {}
  for i, ev in enumerate(layers):
    for k, v in ev.measured.items():
      measured[k] = measured.get(k, 0.0) + v
    nxt = layers[i + 1] if i + 1 < n else None
    act_bytes = ev.tokens * act_width
    start = t
    if nxt is not None and nxt.layerwise_loads:
      layerwise[i + 1] = h2d(start, batch_bytes(nxt, nxt.layerwise_loads))

    attention = Interval(start, start + dense_gpu(ev.dense_bytes, ev.tokens) + prof.kernel_overhead_s)
    plan = attention.end
    demand = h2d(plan, batch_bytes(ev, ev.demand_loads)) if ev.demand_loads else None
    predictor = None
    if ev.predictor_bytes:
      predictor = Interval(plan, plan + dense_gpu(ev.predictor_bytes, ev.tokens) + prof.kernel_overhead_s)
    ready = predictor.end if predictor else plan

    # CPU path: activations down, compute, one summed result back up.
    cpu_input = cpu = cpu_output = None
    if ev.cpu_experts:
      cpu_start = plan
      if act_bytes:
        cpu_input = Interval(plan, plan + prof.link_latency_s + act_bytes / prof.link_bw)
        cpu_start = cpu_input.end
      cpu_start = max(cpu_start, cpu_free)
      pairs = ev.cpu_pairs if ev.cpu_pairs is not None else ev.tokens * ev.cpu_experts
      cpu_time = max(ev.cpu_experts * ev.expert_bytes * scale / prof.cpu_mem_bw,
                     2.0 * pairs * ev.expert_bytes / dtype_bytes / prof.cpu_flops)
      cpu = Interval(cpu_start, cpu_start + cpu_time)
      cpu_free = cpu.end

    # Host->device queue in issue order: CPU result (at cpu.end) and the
    # prefetch for the next layer (at `ready`); ties go to the CPU result.
    def issue_cpu_output():
      return h2d(cpu.end, act_bytes)

    def issue_prefetch():
      prefetch[i + 1] = h2d(ready, batch_bytes(nxt, nxt.prefetch_loads))

    want_out = cpu is not None and act_bytes > 0
    want_pre = nxt is not None and nxt.prefetch_loads > 0
    if want_out and want_pre and ready < cpu.end:
      issue_prefetch()
      cpu_output = issue_cpu_output()
    else:
      if want_out:
        cpu_output = issue_cpu_output()
      if want_pre:
        issue_prefetch()

    n_gpu = ev.gpu_experts
    expert_start = ready
    if demand is not None:
      expert_start = max(expert_start, demand.end)
    if ev.prefetch_used and prefetch[i] is not None:
      expert_start = max(expert_start, prefetch[i].end)
    if n_gpu and layerwise[i] is not None:
      expert_start = max(expert_start, layerwise[i].end)
    gpu_pairs = ev.gpu_pairs if ev.gpu_pairs is not None else ev.tokens * n_gpu
    expert_time = _gpu_time(prof, n_gpu * ev.expert_bytes * scale,
                            2.0 * gpu_pairs * ev.expert_bytes / dtype_bytes)
    experts = Interval(expert_start, expert_start + expert_time)

    end = experts.end
    cpu_done = cpu_output.end if cpu_output else (cpu.end if cpu else end)
    end = max(end, cpu_done)

    transfers = (layerwise[i], prefetch[i], demand, cpu_input, cpu_output)
    timelines.append(LayerTimeline(
        layer=ev.layer,
        start=start,
        end=end,
        attention=attention,
        predictor=predictor,
        layerwise_copy=layerwise[i],
        prefetch_copy=prefetch[i],
        demand_copy=demand,
        cpu_input=cpu_input,
        cpu=cpu,
        cpu_output=cpu_output,
        experts=experts,
        gpu_s=attention.duration + (predictor.duration if predictor else 0.0) + experts.duration,
        link_s=sum(x.duration for x in transfers if x is not None),
        cpu_s=cpu.duration if cpu else 0.0,
        copy_stall_s=expert_start - ready,
        cpu_wait_s=end - experts.end,
    ))
    t = end

  head = Interval(t, t + dense_gpu(st.head_bytes, st.tokens) + prof.kernel_overhead_s)
  return StepEstimate(
      step=st.step,
      kind=st.kind,
      tokens=st.tokens,
      time_s=head.end,
      layers=tuple(timelines),
      head=head,
      gpu_s=head.duration + sum(lt.gpu_s for lt in timelines),
      link_s=sum(lt.link_s for lt in timelines),
      cpu_s=sum(lt.cpu_s for lt in timelines),
      stall_s=sum(lt.stall_s for lt in timelines),
      wall_s=st.wall_s,
      measured=measured,
  )


def estimate_tpot(trace: Sequence[StepTrace], profile: HardwareProfile | str, *,
                  dtype_bytes: int | None = None,
                  target_dtype_bytes: int | None = None) -> Estimate:
  """Estimate TPOT/TTFT of a recorded run on a hardware profile.

  Args:
    trace: the run's steps, in order (prefill chunks and decode steps).
    profile: a `HardwareProfile` or the name of one in `PROFILES`.
    dtype_bytes: bytes per weight element of the trace's byte counts; None
      uses each step's `StepTrace.dtype_bytes` (what the run recorded).
    target_dtype_bytes: if set, weights are assumed stored, copied and
      computed in this width on the target hardware (e.g. 2 for fp16 as in
      the paper when the run used float32): every weight byte count is
      scaled by target_dtype_bytes / dtype_bytes, activations use this width.

  Returns:
    An `Estimate` (label "estimate"); see the module docstring for the model.
  """
  prof = get_profile(profile) if isinstance(profile, str) else profile
  for name, v in (("dtype_bytes", dtype_bytes), ("target_dtype_bytes", target_dtype_bytes)):
    if v is not None and (not isinstance(v, int) or v <= 0):
      raise ValueError(f"{name} must be a positive int (bytes per weight element), got {v!r}")
  steps = []
  for st in trace:
    if not isinstance(st, StepTrace):
      raise TypeError(f"trace must hold StepTrace records, got {type(st).__name__}")
    steps.append(_estimate_step(st, prof, dtype_bytes or st.dtype_bytes, target_dtype_bytes))

  decode = [s for s in steps if s.kind == "decode"]
  tpot = statistics.fmean(s.time_s for s in decode) if decode else None
  decode_time = sum(s.time_s for s in decode)
  throughput = sum(s.tokens for s in decode) / decode_time if decode and decode_time > 0 else None

  prefills, run = [], 0.0
  in_run = False
  for s in steps:
    if s.kind == "prefill":
      run = run + s.time_s if in_run else s.time_s
      in_run = True
    elif in_run:
      prefills.append(run)
      in_run = False
  if in_run:
    prefills.append(run)
  ttft = statistics.fmean(prefills) if prefills else None

  return Estimate(
      profile=prof.name,
      tpot_s=tpot,
      ttft_s=ttft,
      decode_tokens_per_s=throughput,
      steps=tuple(steps),
      dtype_bytes=dtype_bytes,
      target_dtype_bytes=target_dtype_bytes,
      hardware=prof,
  )


def summarize(estimate: Estimate, *, timelines: bool = False) -> dict[str, Any]:
  """JSON-ready summary: label, profile (numbers and sources), TPOT/TTFT,
  decode/prefill totals, per-layer means, per-step breakdown.

  Args:
    estimate: from `estimate_tpot`.
    timelines: include every step's per-layer timeline (large for long runs).
  """
  decode = [s for s in estimate.steps if s.kind == "decode"]

  def totals(steps):
    keys = ("time_s", "gpu_s", "link_s", "cpu_s", "stall_s", "wall_s")
    return {k: sum(getattr(s, k) for s in steps) for k in keys} | {"steps": len(steps)}

  return {
      "label": estimate.label,
      "profile": estimate.profile,
      "profile_spec": estimate.hardware.to_dict(),
      "dtype_bytes": estimate.dtype_bytes,
      "target_dtype_bytes": estimate.target_dtype_bytes,
      "tpot_s": estimate.tpot_s,
      "ttft_s": estimate.ttft_s,
      "decode_tokens_per_s": estimate.decode_tokens_per_s,
      "decode_totals": totals(decode),
      "prefill_totals": totals([s for s in estimate.steps if s.kind == "prefill"]),
      "decode_layers": estimate.layer_breakdown("decode"),
      "prefill_layers": estimate.layer_breakdown("prefill"),
      "steps": [s.to_dict(timelines=timelines) for s in estimate.steps],
  }
