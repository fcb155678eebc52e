"""Pipeline TPOT/TTFT estimator: replay a run's trace on a hardware profile.

On a machine without an accelerator, wall-clock TPOT measures only our own
overheads. This module replays the exact per-step schedule a run recorded
(`moejax.sim.trace.StepTrace`) on a `HardwareProfile` and returns an
`Estimate`, always labelled `label == "estimate"`.

The pipeline model
==================

Three resources, each doing one thing at a time: the GPU (one stream), the
host->device link (copies are served first issued, first served), and the
CPU (expert matmuls use all cores, one expert batch after another). Every
step is simulated on its own, starting at t = 0 with all three idle; steps
do not overlap (each decode step needs the previous token).

One MoE layer l on the GPU (SPEC section 5):

```
GPU:  attention+router(l) | plan | resident experts(l) | predictor | demand-loaded experts(l) | end
link:                            | demand loads(l) ............... | prefetch(l+1) .........
CPU:                             | CPU experts(l) .......................... | result -> GPU
```

- attention: attention, norms, router, shared experts (or the dense MLP).
- plan: `plan_s` of the profile, once per MoE layer (not for a layer
  streamed whole by layerwise loads, whose routing needs no plan). Demand
  loads and the CPU work are issued when it ends.
- resident experts: `hits + prefetch_used`; they wait for this layer's
  prefetch copy (if one was used) and its layerwise copy.
- predictor, for the next MoE layer, by `LayerEvent.predictor`:
  "provisional" runs after the resident experts (its input, the provisional
  output, needs them); "gate" runs right after the plan (it reads this
  layer's MoE input); "layernorm" runs after the resident experts like the
  released code's worker thread, but its prefetch is issued only at the
  layer end; "activation" and "" do no device work and their prefetch is
  issued at plan end.
- demand-loaded experts wait for the demand copy.
- the layer ends when its demand-loaded experts are done and the CPU result
  is back on the device; layer l+1 starts then (it needs l's output).

Notation for one layer event `ev` of a step with `dtype_bytes` = b and
`scale` = target_dtype_bytes / b (1 unless `target_dtype_bytes` is given;
all weight byte counts are multiplied by it, parameter counts are not):

    gpu(B, F)      = max(B * scale / gpu_mem_bw, F / gpu_flops)   [roofline]
    params(B)      = B / b            (parameters of a weight block of B bytes)
    copy(n)        = link_latency_s + n * expert_bytes * scale / link_bw
    act            = tokens * hidden_size * (target_dtype_bytes or b)  [bytes]
    n_res, n_dem   = hits + prefetch_used, demand_loads
    gpu_pairs      = ev.gpu_pairs, or tokens * (n_res + n_dem) if unknown
    dem_pairs      = ev.demand_pairs; if unknown: tokens * n_dem when
                     gpu_pairs is unknown too, else gpu_pairs split in
                     proportion to n_res : n_dem
    res_pairs      = gpu_pairs - dem_pairs
    cpu_pairs      = ev.cpu_pairs, or tokens * cpu_experts if unknown

GPU work of layer l (serial, in the order above):

    attention  = gpu(dense_bytes, 2 * tokens * params(dense_bytes)) + kernel_overhead_s
    plan       = plan_s
    predictor  = gpu(predictor_bytes, 2 * tokens * params(predictor_bytes))
                 + kernel_overhead_s, only if predictor_bytes > 0
    resident   = gpu(n_res * expert_bytes, 2 * res_pairs * params(expert_bytes))
    demand     = gpu(n_dem * expert_bytes, 2 * dem_pairs * params(expert_bytes))

FLOP approximation: a matmul with P weights applied to T tokens costs 2*T*P
FLOPs, so a weight block of B bytes costs 2 * tokens * B / b. This ignores the
attention score/value products (2 * tokens * context * heads * head_dim,
relevant only at long context), norms and activations, and, when the pairs
are not recorded, assumes every computed expert sees every token of the step
(exact for batch-1 decode, an over-estimate for prefill and batched decode).

Copies (each kind of copy for one layer is one transfer batch, costing
`copy(n)`; a batch starts at max(issue time, link free)):

- layerwise loads for layer l are issued when layer l-1 starts (its
  attention start), i.e. streamed one layer ahead; layer 0's at t = 0.
- demand loads for layer l are issued at the end of its plan.
- the prefetch for MoE layer m is issued by the previous MoE layer l when
  l's predictor ends ("layernorm": at l's end; "activation" or no
  predictor: at l's plan end); a prefetch for the first MoE layer of a step
  is issued at t = 0.
- the CPU result of layer l (act bytes) goes host->device on the same link
  when the CPU finishes: latency + act / link_bw.

The link serves copies in issue-time order (so layer l's prefetch queues
behind its demand loads); copies issued at the same time queue as
layerwise(l+1), demand(l), CPU result(l), prefetch(next). Unused prefetches
cost link time only (they can delay later copies). The GPU's waits for
copies before the resident and the demand-loaded experts are the layer's
copy stall.

CPU experts of layer l: the activations go device->host at plan end
(latency + act / link_bw; the other link direction, so not queued behind
host->device copies; skipped when act = 0), then the CPU computes

    cpu = max(cpu_experts * expert_bytes * scale / cpu_mem_bw,
              2 * cpu_pairs * params(expert_bytes) / cpu_flops)

overlapping the copies and the GPU. The CPU sums its experts' weighted
outputs, so one act-sized result is copied back (skipped when act = 0).

After the last layer the head runs on the GPU:
gpu(head_bytes, 2 * tokens * params(head_bytes)) + kernel_overhead_s
(embedding rows, final norm, lm head; the embedding lookup is accounted at
the end, which changes no total). The step time is the head's end.

The load/CPU split on the target
================================
A layer whose misses were split by a rule (`LayerEvent.split` "balance" or
"greedy") is re-split with the profile's own per-expert costs
(`moejax.sim.profiles.expert_costs`, at the layer's mean tokens per missed
expert): `split_misses` counts how many of the `demand_loads + cpu_experts`
misses the rule loads. Both rules fix the counts from the number of misses and
the two costs alone. The demand/CPU experts and their pairs move in
proportion. Only this layer's timing changes: the experts the target would
have loaded instead of computing (or the reverse) would also change later
hits, which a trace cannot replay. `estimate_tpot(..., resplit=False)` keeps
the recorded split.

Reported numbers
================

- `tpot_s`: mean estimated time of the decode steps (the time between two
  tokens of a sequence; a decode step of a batch of B sequences gives each
  sequence one token). None when the trace has no decode step.
- `ttft_s`: mean over prefills of the estimated prefill time, where a prefill
  is a maximal run of consecutive prefill steps (chunks); None if none.
- per step (`StepEstimate`) and per layer (`LayerTimeline`): gpu_s (GPU busy,
  the plan included), link_s (transfers serving this layer, both
  directions), cpu_s (CPU busy), stall_s = copy_stall_s + cpu_wait_s, where
  cpu_wait_s is the time the layer end waits for the CPU path after the GPU
  is done. For every layer, end - start == gpu_s + stall_s exactly.
- `resplit_layers`: layer events whose load/CPU split the profile's costs
  changed.
- `Estimate.layer_breakdown(kind)`: per-layer-index means over steps.
- `summarize(estimate)`: a JSON-ready dict.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from moejax.sim.profiles import HardwareProfile, expert_costs, get_profile
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
  `layerwise_copy` are the copies *for* this layer (issued during an earlier
  layer). `resident_experts` and `demand_experts` may have zero length;
  `experts` spans both (with the predictor between them, if it runs there).
  `demand_loads` and `cpu_experts` are the counts the estimate used (after a
  re-split, if `resplit`).
  """

  layer: int
  start: float
  end: float
  attention: Interval
  plan: Interval | None
  predictor: Interval | None
  layerwise_copy: Interval | None
  prefetch_copy: Interval | None
  demand_copy: Interval | None
  cpu_input: Interval | None
  cpu: Interval | None
  cpu_output: Interval | None
  resident_experts: Interval
  demand_experts: Interval
  experts: Interval
  gpu_s: float
  link_s: float
  cpu_s: float
  copy_stall_s: float
  cpu_wait_s: float
  demand_loads: int
  cpu_experts: int
  resplit: bool

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
  resplit_layers: int

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
      "resplit_layers": self.resplit_layers,
    }
    if timelines:
      d["head"] = _iv(self.head)
      d["layers"] = [lt.to_dict() for lt in self.layers]
    return d


@dataclasses.dataclass(frozen=True)
class Estimate:
  """TPOT/TTFT estimated for one profile. `label` is always "estimate".

  `profile` is the profile's name, `hardware` the profile itself (numbers and
  sources), `steps` the per-step timelines in trace order. `resplit` says
  whether rule-split layers were re-split with the profile's costs, and
  `resplit_layers` how many layer events (over all steps) that changed.
  """

  profile: str
  tpot_s: float | None
  ttft_s: float | None
  decode_tokens_per_s: float | None
  steps: tuple[StepEstimate, ...]
  dtype_bytes: int | None
  target_dtype_bytes: int | None
  hardware: HardwareProfile
  resplit: bool
  resplit_layers: int
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


def split_misses(misses: int, c_load: float, c_cpu: float, rule: str) -> int:
  """How many of `misses` missed experts a split rule loads (the rest go to the CPU).

  Both rules take the misses one by one, keeping the accumulated load and CPU
  seconds (float32, as the engine's cost model does):

  - "balance" (SPEC section 6, `moejax.scheduling.balance.split_load_cpu`):
    load while the load total is not above the CPU total, else CPU.
  - "greedy" (the released SMoE code): load only while the load total is
    below the CPU total, else CPU; so the first miss goes to the CPU.

  Which experts go where depends on their scores (balance) or token counts
  (greedy); how many depends only on the count and the two costs.

  Args:
    misses: missed experts of the layer.
    c_load: seconds to copy one expert.
    c_cpu: seconds to compute one expert on the CPU.
    rule: "balance" or "greedy".
  """
  if rule not in ("balance", "greedy"):
    raise ValueError(f"rule must be 'balance' or 'greedy', got {rule!r}")
  c_load, c_cpu = np.float32(c_load), np.float32(c_cpu)
  t_load = t_cpu = np.float32(0)
  n_load = 0
  for _ in range(misses):
    if t_load <= t_cpu if rule == "balance" else t_load < t_cpu:
      n_load, t_load = n_load + 1, t_load + c_load
    else:
      t_cpu = t_cpu + c_cpu
  return n_load


def _gpu_time(prof: HardwareProfile, nbytes: float, flops: float) -> float:
  return max(nbytes / prof.gpu_mem_bw, flops / prof.gpu_flops)


class _Work(NamedTuple):
  """One layer's device/CPU split as the estimate prices it."""

  demand: int  # demand-loaded experts
  cpu: int  # CPU experts
  res_pairs: float
  dem_pairs: float
  cpu_pairs: float
  resplit: bool


def _layer_work(ev: LayerEvent, prof: HardwareProfile, scale: float, width: int, resplit: bool) -> _Work:
  """Pairs per expert group (module docstring), after re-splitting the misses if asked."""
  n_res, demand, cpu = ev.resident_experts, ev.demand_loads, ev.cpu_experts
  gpu_pairs = ev.gpu_pairs if ev.gpu_pairs is not None else ev.tokens * (n_res + demand)
  if ev.demand_pairs is not None:
    dem_pairs = ev.demand_pairs
  elif ev.gpu_pairs is None:
    dem_pairs = ev.tokens * demand
  else:
    dem_pairs = gpu_pairs * demand / (n_res + demand) if n_res + demand else 0
  res_pairs = gpu_pairs - dem_pairs
  cpu_pairs = ev.cpu_pairs if ev.cpu_pairs is not None else ev.tokens * cpu
  misses, miss_pairs = demand + cpu, dem_pairs + cpu_pairs
  changed = False
  if resplit and ev.split and misses:
    c_load, c_cpu = expert_costs(prof, ev.expert_bytes * scale, tokens=miss_pairs / misses, dtype_bytes=width)
    n_load = split_misses(misses, c_load, c_cpu, ev.split)
    changed = n_load != demand
    demand, cpu = n_load, misses - n_load
    dem_pairs = miss_pairs * demand / misses
    cpu_pairs = miss_pairs - dem_pairs
  return _Work(demand, cpu, res_pairs, dem_pairs, cpu_pairs, changed)


def _estimate_step(
  st: StepTrace, prof: HardwareProfile, dtype_bytes: int, target_dtype_bytes: int | None, resplit: bool
) -> StepEstimate:
  """Simulate one step from t = 0; see the module docstring for the rules."""
  scale = 1.0 if target_dtype_bytes is None else target_dtype_bytes / dtype_bytes
  width = target_dtype_bytes or dtype_bytes  # bytes per weight element and per activation on the target
  layers = st.layers
  n = len(layers)
  moe = [i for i, ev in enumerate(layers) if ev.expert_bytes]
  next_moe = dict(itertools.pairwise(moe))  # MoE layer -> the MoE layer its predictor prefetches for

  link_free = 0.0

  def h2d(issue: float, nbytes: float) -> Interval:
    nonlocal link_free
    start = max(issue, link_free)
    link_free = start + prof.link_latency_s + nbytes / prof.link_bw
    return Interval(start, link_free)

  def gpu_span(start: float, nbytes: float, tokens: int) -> Interval:
    """A dense weight block of `nbytes` (as recorded) applied to `tokens` tokens, plus the launch overhead."""
    return Interval(
      start, start + _gpu_time(prof, nbytes * scale, 2.0 * tokens * nbytes / dtype_bytes) + prof.kernel_overhead_s
    )

  def experts_span(start: float, ev: LayerEvent, count: int, pairs: float) -> Interval:
    """`count` routed experts computing `pairs` token-expert pairs."""
    flops = 2.0 * pairs * ev.expert_bytes / dtype_bytes
    return Interval(start, start + _gpu_time(prof, count * ev.expert_bytes * scale, flops))

  def batch_bytes(ev: LayerEvent, count: int) -> float:
    return count * ev.expert_bytes * scale

  layerwise: list[Interval | None] = [None] * n
  prefetch: list[Interval | None] = [None] * n
  if n and layers[0].layerwise_loads:
    layerwise[0] = h2d(0.0, batch_bytes(layers[0], layers[0].layerwise_loads))
  if moe and layers[moe[0]].prefetch_loads:
    prefetch[moe[0]] = h2d(0.0, batch_bytes(layers[moe[0]], layers[moe[0]].prefetch_loads))

  t = 0.0
  cpu_free = 0.0
  timelines = []
  measured: dict[str, float] = {}
  for i, ev in enumerate(layers):
    for k, v in ev.measured.items():
      measured[k] = measured.get(k, 0.0) + v
    act_bytes = ev.tokens * st.hidden_size * width
    start = t
    if i + 1 < n and layers[i + 1].layerwise_loads:
      layerwise[i + 1] = h2d(start, batch_bytes(layers[i + 1], layers[i + 1].layerwise_loads))
    target = next_moe.get(i)
    want_prefetch = target is not None and layers[target].prefetch_loads > 0
    work = _layer_work(ev, prof, scale, width, resplit)

    attention = gpu_span(start, ev.dense_bytes, ev.tokens)
    plan = None
    if ev.expert_bytes and not ev.layerwise_loads:
      plan = Interval(attention.end, attention.end + prof.plan_s)
    plan_end = plan.end if plan else attention.end
    predictor = None
    if ev.predictor_bytes and ev.predictor == "gate":
      predictor = gpu_span(plan_end, ev.predictor_bytes, ev.tokens)
    ready = predictor.end if predictor else plan_end

    # Resident experts: wait for this layer's prefetch copy (if used) and layerwise copy.
    res_start = ready
    if ev.prefetch_used and prefetch[i] is not None:
      res_start = max(res_start, prefetch[i].end)
    if ev.resident_experts and layerwise[i] is not None:
      res_start = max(res_start, layerwise[i].end)
    resident = experts_span(res_start, ev, ev.resident_experts, work.res_pairs)
    stall = res_start - ready
    after_resident = resident.end
    if ev.predictor_bytes and ev.predictor in ("provisional", "layernorm"):
      predictor = gpu_span(resident.end, ev.predictor_bytes, ev.tokens)
      after_resident = predictor.end
    prefetch_at_end = ev.predictor == "layernorm"  # issued once the layer is done
    prefetch_issue = {"provisional": after_resident, "gate": ready}.get(ev.predictor, plan_end)

    # CPU path: activations down at plan end, compute, one summed result back up.
    cpu_input = cpu = None
    if work.cpu:
      cpu_start = plan_end
      if act_bytes:
        cpu_input = Interval(plan_end, plan_end + prof.link_latency_s + act_bytes / prof.link_bw)
        cpu_start = cpu_input.end
      cpu_start = max(cpu_start, cpu_free)
      cpu_time = max(
        work.cpu * ev.expert_bytes * scale / prof.cpu_mem_bw,
        2.0 * work.cpu_pairs * ev.expert_bytes / dtype_bytes / prof.cpu_flops,
      )
      cpu = Interval(cpu_start, cpu_start + cpu_time)
      cpu_free = cpu.end

    # Host->device queue in issue order; ties: demand, CPU result, prefetch.
    requests = []
    if work.demand:
      requests.append((plan_end, 0, "demand", batch_bytes(ev, work.demand)))
    if cpu is not None and act_bytes:
      requests.append((cpu.end, 1, "cpu_output", act_bytes))
    if want_prefetch and not prefetch_at_end:
      requests.append((prefetch_issue, 2, "prefetch", batch_bytes(layers[target], layers[target].prefetch_loads)))
    served = {name: h2d(issue, nbytes) for issue, _, name, nbytes in sorted(requests)}
    demand, cpu_output = served.get("demand"), served.get("cpu_output")
    if "prefetch" in served:
      prefetch[target] = served["prefetch"]

    dem_start = max(after_resident, demand.end) if demand else after_resident
    demand_experts = experts_span(dem_start, ev, work.demand, work.dem_pairs)
    stall += dem_start - after_resident
    cpu_done = cpu_output.end if cpu_output else (cpu.end if cpu else demand_experts.end)
    end = max(demand_experts.end, cpu_done)
    if want_prefetch and prefetch_at_end:
      prefetch[target] = h2d(end, batch_bytes(layers[target], layers[target].prefetch_loads))

    parts = (attention, plan, predictor, resident, demand_experts)
    transfers = (layerwise[i], prefetch[i], demand, cpu_input, cpu_output)
    timelines.append(
      LayerTimeline(
        layer=ev.layer,
        start=start,
        end=end,
        attention=attention,
        plan=plan,
        predictor=predictor,
        layerwise_copy=layerwise[i],
        prefetch_copy=prefetch[i],
        demand_copy=demand,
        cpu_input=cpu_input,
        cpu=cpu,
        cpu_output=cpu_output,
        resident_experts=resident,
        demand_experts=demand_experts,
        experts=Interval(resident.start, demand_experts.end),
        gpu_s=sum(x.duration for x in parts if x is not None),
        link_s=sum(x.duration for x in transfers if x is not None),
        cpu_s=cpu.duration if cpu else 0.0,
        copy_stall_s=stall,
        cpu_wait_s=end - demand_experts.end,
        demand_loads=work.demand,
        cpu_experts=work.cpu,
        resplit=work.resplit,
      )
    )
    t = end

  head = gpu_span(t, st.head_bytes, st.tokens)
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
    resplit_layers=sum(lt.resplit for lt in timelines),
  )


def estimate_tpot(
  trace: Sequence[StepTrace],
  profile: HardwareProfile | str,
  *,
  dtype_bytes: int | None = None,
  target_dtype_bytes: int | None = None,
  resplit: bool = True,
) -> Estimate:
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
    resplit: re-split the misses of layers split by a rule with the
      profile's costs (module docstring); False keeps the recorded split.

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
    steps.append(_estimate_step(st, prof, dtype_bytes or st.dtype_bytes, target_dtype_bytes, resplit))

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
    resplit=resplit,
    resplit_layers=sum(s.resplit_layers for s in steps),
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
    "resplit": estimate.resplit,
    "resplit_layers": estimate.resplit_layers,
    "decode_totals": totals(decode),
    "prefill_totals": totals([s for s in estimate.steps if s.kind == "prefill"]),
    "decode_layers": estimate.layer_breakdown("decode"),
    "prefill_layers": estimate.layer_breakdown("prefill"),
    "steps": [s.to_dict(timelines=timelines) for s in estimate.steps],
  }
