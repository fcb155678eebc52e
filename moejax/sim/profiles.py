"""Named hardware profiles for the pipeline TPOT estimator.

Every number carries its provenance in `HardwareProfile.sources`:
"vendor: ..." (a published spec), "derived: ..." (arithmetic on published
specs, shown), or "assumption: ..." (our estimate; change it if you measured
better). Units are SI: bytes, seconds, B/s, FLOP/s (1 GB/s = 1e9 B/s). GPU
memory capacities are binary (12 GB GDDR = 12 GiB).

`gpu_flops` is the dense (no structured sparsity) tensor-core rate for
16-bit weights with the accumulation a framework uses by default (FP32
accumulate for fp16 GEMMs). GeForce cards run that at half their FP16-
accumulate rate; the vendor's headline "AI TOPS" figures are sparse and are
halved (and halved again where noted). Decode at small batch is memory-bound,
so `gpu_flops` mostly matters for prefill (TTFT).

Host links: PCIe 4.0 runs 16 GT/s per lane with 128b/130b encoding, i.e.
1.969 GB/s per lane and direction (31.5 GB/s for x16); PCIe 5.0 doubles that
(63.0 GB/s for x16). Pinned-memory host->device copies typically reach about
80% of the raw rate; we use that as the effective `link_bw` (assumption).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

GiB = 1024**3

_NUMERIC_FIELDS = (
  "gpu_mem_bw",
  "gpu_flops",
  "gpu_memory",
  "link_bw",
  "link_latency_s",
  "cpu_mem_bw",
  "cpu_flops",
  "cpu_cores",
  "kernel_overhead_s",
  "plan_s",
)
_MAY_BE_ZERO = ("link_latency_s", "kernel_overhead_s", "plan_s")


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
  """Numbers the estimator needs for one machine (device + host + link).

  Attributes:
    name: profile name (key of `PROFILES`).
    gpu_mem_bw: device memory bandwidth, B/s.
    gpu_flops: device dense matmul rate for the weight dtype, FLOP/s.
    gpu_memory: device memory capacity, bytes.
    link_bw: effective host->device copy bandwidth, B/s (also used for the
      small device->host activation copies of CPU-computed experts).
    link_latency_s: fixed cost per transfer batch, s.
    cpu_mem_bw: effective host memory bandwidth available to expert GEMVs, B/s.
    cpu_flops: aggregate host matmul rate over all cores, FLOP/s.
    cpu_cores: host cores (informational; `cpu_flops` already aggregates them).
    kernel_overhead_s: launch/synchronisation overhead per decoder layer, s.
    plan_s: time to plan one MoE layer (route, substitute, choose evictions
      and the load/CPU split) between its router and its experts, s.
    sources: for every numeric field, where the number comes from.
  """

  name: str
  gpu_mem_bw: float
  gpu_flops: float
  gpu_memory: int
  link_bw: float
  link_latency_s: float
  cpu_mem_bw: float
  cpu_flops: float
  cpu_cores: int
  kernel_overhead_s: float
  plan_s: float
  sources: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False, compare=False)

  def __post_init__(self):
    for name in _NUMERIC_FIELDS:
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"HardwareProfile({self.name}).{name} must be a finite number, got {v!r}")
      if v < 0 or (v == 0 and name not in _MAY_BE_ZERO):
        raise ValueError(f"HardwareProfile({self.name}).{name} must be > 0, got {v!r}")
    object.__setattr__(self, "sources", dict(self.sources))

  def to_dict(self) -> dict:
    """JSON-serialisable form (numbers and sources)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["sources"] = dict(self.sources)
    return d


_PCIE4_X16_RAW = 16e9 * 16 * 128 / 130 / 8  # 31.5e9 B/s per direction
_PCIE4_X8_RAW = _PCIE4_X16_RAW / 2  # 15.8e9
_PCIE5_X16_RAW = 2 * _PCIE4_X16_RAW  # 63.0e9
_LINK_EFFICIENCY = 0.8


def _desktop_host(link_raw: float, link_name: str) -> tuple[dict, dict]:
  """The paper-style desktop host: 8 cores, dual-channel DDR4-3200, PCIe link."""
  values = {
    "link_bw": _LINK_EFFICIENCY * link_raw,
    "link_latency_s": 10e-6,
    "cpu_mem_bw": 40e9,
    "cpu_flops": 8 * 3.5e9 * 32,
    "cpu_cores": 8,
  }
  sources = {
    "link_bw": (
      f"assumption: 80% of the {link_name} raw rate "
      f"({link_raw / 1e9:.1f} GB/s per direction: lanes x 16 GT/s x 128/130 / 8, "
      "PCI-SIG PCIe 4.0 spec), typical pinned cudaMemcpyAsync throughput"
    ),
    "link_latency_s": "assumption: ~10 us per copy batch (cudaMemcpyAsync issue + DMA setup)",
    "cpu_mem_bw": (
      "assumption: 8-core desktop host (e.g. Ryzen 7 5800X class) with dual-channel "
      "DDR4-3200 = 51.2 GB/s theoretical (JEDEC), ~40 GB/s sustained"
    ),
    "cpu_flops": (
      "assumption: 8 cores x 3.5 GHz x 32 FP32 FLOP/cycle (AVX2, two 256-bit FMA units) = 896 GFLOP/s peak"
    ),
    "cpu_cores": "assumption: 8-core desktop host",
  }
  return values, sources


def _plan(launch_us: float, sync_us: float) -> tuple[float, str]:
  """`plan_s` and its source: ~5 small device kernels and one read of the copy list back to the host."""
  return (5 * launch_us + sync_us) / 1e6, (
    f"assumption: the plan of one MoE layer (route + observe + admit over its E experts) as ~5 small device "
    f"kernels of ~{launch_us:g} us plus ~{sync_us:g} us to read the copy list back to the host = "
    f"{5 * launch_us + sync_us:g} us; benchmarks/scheduler_speed.py measured 0.23 ms for it (one 64-expert "
    "layer, batch 1) on a 2-core x86 CPU under XLA:CPU, an upper end; the released SMoE code plans in Python "
    "loops on the host, slower still"
  )


_PLAN_DESKTOP = _plan(launch_us=5, sync_us=20)


def _profile(name: str, gpu: dict, gpu_sources: dict, host: tuple[dict, dict]) -> HardwareProfile:
  values = {**gpu, **host[0]}
  sources = {**gpu_sources, **host[1]}
  return HardwareProfile(name=name, sources=sources, **values)


_RTX3080TI = _profile(
  "rtx3080ti_12gb",
  {
    "gpu_mem_bw": 912e9,
    "gpu_flops": 68.2e12,
    "gpu_memory": 12 * GiB,
    "kernel_overhead_s": 20e-6,
    "plan_s": _PLAN_DESKTOP[0],
  },
  {
    "gpu_mem_bw": (
      "vendor: NVIDIA GeForce RTX 3080 Ti specs, 384-bit GDDR6X at 19 Gbps = 912 GB/s "
      "(https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3080-3080ti/)"
    ),
    "gpu_flops": (
      "derived: NVIDIA lists 273 sparse FP16 tensor TFLOPS (FP16 accumulate) for the "
      "RTX 3080 Ti; dense = 136.4; GeForce Ampere runs FP16 with FP32 accumulate at half "
      "rate (NVIDIA Ampere GA102 GPU architecture whitepaper) -> 68.2 TFLOP/s"
    ),
    "gpu_memory": "vendor: NVIDIA GeForce RTX 3080 Ti specs, 12 GB GDDR6X",
    "kernel_overhead_s": (
      "assumption: ~20 us per decoder layer of kernel launches and synchronisation (a few launches of ~5 us)"
    ),
    "plan_s": _PLAN_DESKTOP[1],
  },
  _desktop_host(_PCIE4_X16_RAW, "PCIe 4.0 x16"),
)

_RTX4060TI = _profile(
  "rtx4060ti_16gb",
  {
    "gpu_mem_bw": 288e9,
    "gpu_flops": 44.1e12,
    "gpu_memory": 16 * GiB,
    "kernel_overhead_s": 20e-6,
    "plan_s": _PLAN_DESKTOP[0],
  },
  {
    "gpu_mem_bw": (
      "vendor: NVIDIA GeForce RTX 4060 Ti 16GB specs, 128-bit GDDR6 at 18 Gbps = 288 GB/s "
      "(https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4060-4060ti/)"
    ),
    "gpu_flops": (
      "derived: AD106, 34 SMs x 2.535 GHz boost x 1024 dense FP16 FLOP/clk/SM (FP16 "
      "accumulate, NVIDIA Ada Lovelace architecture whitepaper rate per SM) = 88.3 TFLOP/s, "
      "consistent with NVIDIA's 353 AI TOPS (FP8, sparse) = 4 x 88.3; FP32 accumulate "
      "runs at half rate on GeForce -> 44.1 TFLOP/s"
    ),
    "gpu_memory": "vendor: NVIDIA GeForce RTX 4060 Ti specs, 16 GB GDDR6",
    "kernel_overhead_s": (
      "assumption: ~20 us per decoder layer of kernel launches and synchronisation (a few launches of ~5 us)"
    ),
    "plan_s": _PLAN_DESKTOP[1],
  },
  # The RTX 4060 Ti has an x8 interface (NVIDIA specs: "PCI Express 4.0 x8"),
  # so even in an x16 slot the link runs at half the x16 rate.
  _desktop_host(_PCIE4_X8_RAW, "PCIe 4.0 x8 (the RTX 4060 Ti is an x8 card, NVIDIA specs)"),
)

_A6000 = _profile(
  "a6000_48gb",
  {
    "gpu_mem_bw": 768e9,
    "gpu_flops": 154.8e12,
    "gpu_memory": 48 * GiB,
    "kernel_overhead_s": 20e-6,
    "plan_s": _PLAN_DESKTOP[0],
  },
  {
    "gpu_mem_bw": (
      "vendor: NVIDIA RTX A6000 datasheet, 48 GB GDDR6 with ECC, 384-bit, 768 GB/s "
      "(https://www.nvidia.com/en-us/design-visualization/rtx-a6000/)"
    ),
    "gpu_flops": (
      "derived: NVIDIA RTX A6000 datasheet lists 309.7 TFLOPS tensor performance with "
      "structured sparsity -> 154.8 dense (professional GA102: FP32 accumulate at full rate)"
    ),
    "gpu_memory": "vendor: NVIDIA RTX A6000 datasheet, 48 GB GDDR6",
    "kernel_overhead_s": (
      "assumption: ~20 us per decoder layer of kernel launches and synchronisation (a few launches of ~5 us)"
    ),
    "plan_s": _PLAN_DESKTOP[1],
  },
  _desktop_host(_PCIE4_X16_RAW, "PCIe 4.0 x16"),
)

_ORIN_DRAM_BW = 204.8e9
_PLAN_JETSON = _plan(launch_us=8, sync_us=30)  # slower launches from the embedded Arm host
_JETSON = HardwareProfile(
  name="jetson_orin_agx",
  gpu_mem_bw=_ORIN_DRAM_BW,
  gpu_flops=42.5e12,
  gpu_memory=64 * GiB,
  link_bw=_ORIN_DRAM_BW / 2,
  link_latency_s=5e-6,
  cpu_mem_bw=_ORIN_DRAM_BW / 2,
  cpu_flops=12 * 2.2e9 * 16,
  cpu_cores=12,
  kernel_overhead_s=30e-6,
  plan_s=_PLAN_JETSON[0],
  sources={
    "gpu_mem_bw": (
      "vendor: NVIDIA Jetson AGX Orin 64GB module datasheet, 256-bit LPDDR5, "
      "204.8 GB/s (https://www.nvidia.com/en-us/autonomous-machines/embedded-systems/jetson-orin/)"
    ),
    "gpu_flops": (
      "derived: Jetson AGX Orin 64GB GPU, 2048 CUDA cores / 64 tensor cores, 170 sparse "
      "INT8 TOPS (vendor) -> 85 dense INT8 -> 42.5 dense FP16 TFLOP/s "
      "(= 16 SMs x 1.3 GHz x 2048 FLOP/clk/SM)"
    ),
    "gpu_memory": (
      "vendor: 64 GB LPDDR5, unified: shared by CPU and GPU, so weights, the expert "
      "cache and host-side experts all come out of the same 64 GB"
    ),
    "link_bw": (
      "assumption: unified memory, a 'host->device' copy is a DRAM-to-DRAM memcpy that "
      "reads and writes every byte: 204.8 / 2 = 102.4 GB/s upper bound"
    ),
    "link_latency_s": "assumption: ~5 us per copy batch (memcpy issue, no PCIe DMA setup)",
    "cpu_mem_bw": ("assumption: the Arm CPU cluster reaches about half of the 204.8 GB/s DRAM bandwidth (~100 GB/s)"),
    "cpu_flops": (
      "derived: 12 Arm Cortex-A78AE cores (vendor) x 2.2 GHz (vendor max) x 16 FP32 "
      "FLOP/cycle (two 128-bit NEON FMA pipes, assumption) = 422 GFLOP/s peak"
    ),
    "cpu_cores": "vendor: 12-core Arm Cortex-A78AE v8.2 64-bit CPU",
    "kernel_overhead_s": (
      "assumption: ~30 us per decoder layer; embedded Arm host, slower kernel launch than a desktop"
    ),
    "plan_s": _PLAN_JETSON[1],
  },
)

_PLAN_H200 = _plan(launch_us=3, sync_us=10)  # fast server host
_H200 = HardwareProfile(
  name="h200",
  gpu_mem_bw=4.8e12,
  gpu_flops=989e12,
  gpu_memory=141 * 10**9,
  link_bw=_LINK_EFFICIENCY * _PCIE5_X16_RAW,
  link_latency_s=10e-6,
  cpu_mem_bw=100e9,
  cpu_flops=16 * 3.0e9 * 32,
  cpu_cores=16,
  kernel_overhead_s=10e-6,
  plan_s=_PLAN_H200[0],
  sources={
    "gpu_mem_bw": "vendor: NVIDIA H200 datasheet, 141 GB HBM3e at 4.8 TB/s (https://www.nvidia.com/en-us/data-center/h200/)",
    "gpu_flops": ("derived: NVIDIA H200 SXM datasheet lists 1,979 BF16/FP16 tensor TFLOPS with sparsity -> 989 dense"),
    "gpu_memory": "vendor: NVIDIA H200 datasheet, 141 GB HBM3e",
    "link_bw": (
      f"assumption: 80% of the PCIe 5.0 x16 raw rate ({_PCIE5_X16_RAW / 1e9:.1f} GB/s per "
      "direction: 16 lanes x 32 GT/s x 128/130 / 8, PCI-SIG PCIe 5.0 spec)"
    ),
    "link_latency_s": "assumption: ~10 us per copy batch (cudaMemcpyAsync issue + DMA setup)",
    "cpu_mem_bw": (
      "assumption: server host, model unknown; ~100 GB/s available to a 16-core share of a multi-channel DDR5 socket"
    ),
    "cpu_flops": ("assumption: 16 cores x 3.0 GHz x 32 FP32 FLOP/cycle (AVX2-class FMA) = 1.5 TFLOP/s peak"),
    "cpu_cores": "assumption: the 16 host cores of the H200 machine this project can borrow",
    "kernel_overhead_s": "assumption: ~10 us per decoder layer (fast host, few launches per layer)",
    "plan_s": _PLAN_H200[1],
  },
)

PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (_RTX3080TI, _RTX4060TI, _A6000, _JETSON, _H200)}


def get_profile(name: str) -> HardwareProfile:
  """The named profile; ValueError listing the known names otherwise."""
  try:
    return PROFILES[name]
  except KeyError:
    raise ValueError(f"unknown hardware profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}") from None


def expert_costs(
  profile: HardwareProfile | str, expert_bytes: int, tokens: int = 1, dtype_bytes: int = 2
) -> tuple[float, float]:
  """(seconds to copy one expert to the device, seconds to compute it on the CPU) on a profile.

  The per-expert costs the load/CPU split (SPEC section 6) weighs, derived
  from the profile exactly as the estimator prices one copy batch and one CPU
  expert: `link_latency_s + expert_bytes / link_bw`, and
  `max(expert_bytes / cpu_mem_bw, 2 * tokens * params / cpu_flops)` with
  `params = expert_bytes / dtype_bytes`.

  Args:
    profile: a `HardwareProfile` or a name in `PROFILES`.
    expert_bytes: bytes of one routed expert as the target stores it.
    tokens: tokens the CPU expert processes (1 for batch-1 decode).
    dtype_bytes: bytes per weight element of `expert_bytes`.
  """
  prof = get_profile(profile) if isinstance(profile, str) else profile
  load_s = prof.link_latency_s + expert_bytes / prof.link_bw
  cpu_s = max(expert_bytes / prof.cpu_mem_bw, 2.0 * tokens * expert_bytes / dtype_bytes / prof.cpu_flops)
  return load_s, cpu_s
