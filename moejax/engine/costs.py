"""Per-expert copy and CPU costs that the load/CPU split weighs (SPEC section 6).

The balance policies split each layer's missed experts between loading and
CPU computation from two numbers, `C_load` and `C_cpu`. Where they come from
is an engine option (`Engine(costs=...)`, `--config.engine.costs`):

- `"calibrate"`: measured once per engine on this machine's own kernels
  (`calibrate`). Wall-clock, so two runs of the
  same setup may split differently and give different accuracy rows.
- a hardware profile name (`moejax.sim.PROFILES`, e.g. `"rtx4060ti_16gb"`):
  the costs the pipeline estimator prices for that machine, for experts stored
  in 16-bit weights (`moejax.sim.profiles.expert_costs`). Deterministic.
- `"LOAD_S,CPU_S"` or a pair `(load_s, cpu_s)`: fixed seconds. Deterministic.

Sweeps and lm-eval runs default to a profile, so the same setup gives the same
rows; the choice and the resolved numbers are recorded with every row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.config import MoEConfig
from moejax.models.moe import ExpertWeights, value_dtype
from moejax.offload import slots
from moejax.offload.cpu import host_experts
from moejax.scheduling import balance
from moejax.sim.profiles import PROFILES, expert_costs

CALIBRATE = "calibrate"
DEFAULT_FIXED = "rtx4060ti_16gb"  # what sweeps and lm-eval runs use unless told otherwise
PROFILE_DTYPE_BYTES = 2  # profile costs price 16-bit expert weights, as the estimates do


def resolve_costs(costs: str | Sequence[float] | balance.CostModel, config: MoEConfig) -> balance.CostModel | None:
  """The fixed `CostModel` that `costs` names, or None for `"calibrate"` (measure on this machine).

  Raises ValueError naming the accepted forms for anything else.
  """
  if isinstance(costs, balance.CostModel):
    return costs
  if isinstance(costs, str):
    text = costs.strip()
    if text == CALIBRATE:
      return None
    if text in PROFILES:
      load_s, cpu_s = expert_costs(
        text, config.expert_param_count() * PROFILE_DTYPE_BYTES, dtype_bytes=PROFILE_DTYPE_BYTES
      )
      return _fixed(load_s, cpu_s)
    parts = text.split(",")
    try:
      values = [float(p) for p in parts]
    except ValueError:
      values = []
    if len(values) == 2:
      return _fixed(*values)
  elif isinstance(costs, Sequence) and len(costs) == 2:
    return _fixed(*(float(c) for c in costs))
  raise ValueError(
    f"costs={costs!r}: use {CALIBRATE!r} (measure on this machine), a hardware profile name "
    f"({', '.join(sorted(PROFILES))}), or fixed seconds 'LOAD_S,CPU_S' such as '0.002,0.001'."
  )


def _fixed(load_s: float, cpu_s: float) -> balance.CostModel:
  if not (load_s > 0 and cpu_s > 0):
    raise ValueError(f"costs must be positive seconds per expert, got load_s={load_s}, cpu_s={cpu_s}.")
  # n_load / n_cpu = 1: a measurement, not a prior that the first real one replaces.
  return balance.update_costs(balance.init_cost_model(), load_s=load_s, n_load=1, cpu_s=cpu_s, n_cpu=1)


def describe(model: balance.CostModel) -> dict[str, float]:
  """JSON-ready `{"load_s", "cpu_s"}` of a cost model (recorded with sweep rows)."""
  return {"load_s": float(model.load_s), "cpu_s": float(model.cpu_s)}


def calibrate(config: MoEConfig, store: ExpertWeights, repeats: int = 5) -> balance.CostModel:
  """Measures on this machine the per-expert costs of one copy into a slot and one CPU expert.

  Times (median of `repeats`, after a compiling run) the engine's own kernels
  on one MoE layer's host store `[E, ...]`: `fill_slots` of k experts into
  scratch slots, and `host_experts` of k pairs for one token.
  """
  k = config.num_experts_per_tok
  ids = jnp.arange(k, dtype=jnp.int32)
  dtype = value_dtype(store.gate.dtype)
  scratch = [slots.empty_slots(config, k, dtype)]
  x = jnp.zeros((1, config.hidden_size), dtype)
  cpu = jax.jit(host_experts, static_argnames="act")

  def fill():
    scratch[0] = jax.block_until_ready(slots.write_slots(scratch[0], store, ids, ids))

  def compute():
    jax.block_until_ready(cpu(x, store, ids[None], jnp.ones((1, k)), jnp.ones((1, k), bool), act=config.hidden_act))

  def median(fn):
    fn()  # compile
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return float(np.median(times))

  return balance.update_costs(balance.init_cost_model(), load_s=median(fill), n_load=k, cpu_s=median(compute), n_cpu=k)
