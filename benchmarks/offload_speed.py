"""Offloaded decoding under every policy on a model whose routing moves: hits by class, the oracle bound, bytes,
CPU experts, TPOT here and estimated on the paper's GPUs.

On the random ~128M-parameter Qwen2-MoE of `decode_speed.py` (built with a
token embedding that makes its routing follow the token, `common.py`), every
registered policy with a quarter and a half of the routed experts on the device
(E/4 and E/2 slots per layer, or the same bytes in one pool shared by all layers
for smoe_release) decodes windows of held-out text
(the shipped corpus, tokenised): the prompt prefilled, the continuation
teacher-forced through the decode path. Each policy runs at its own setting:
the smoe family and buddy at alpha 0.3 (buddy's alpha is its substitution
tolerance), cache_prior at its strength log(1 + 0.3), smoe_release at its
published 0.25 on its shared pool, the others at 0 (they have no alpha). Per
row: hit ratio (resident + prefetch hits) and cache hit ratio (resident only),
the Belady bound and the bound with substitution on the row's own routing at
its cache size, distinct experts per layer and their step-to-step reuse (the
routing moves), bytes copied (wasted prefetches among them), CPU experts,
prefetch accuracy, TPOT on this machine (and forward-only, as the paper's code
times it), and the pipeline estimator's TPOT for fp16 weights on the paper's
GPUs (labelled estimates, `moejax.sim`). The load/CPU split uses the RTX 4060
Ti profile's per-expert costs, so the schedule does not depend on this
machine's clock.

  python benchmarks/offload_speed.py --out benchmarks/results/offload_speed.json
"""

from __future__ import annotations

import argparse

import numpy as np
from common import DEFAULT_CHECKPOINT, build_checkpoint, heldout_windows, routing_spread, write_report

EDGE_PROFILES = ("rtx3080ti_12gb", "rtx4060ti_16gb", "a6000_48gb")
COSTS = "rtx4060ti_16gb"
SETTINGS = {"+cr": 0.3, "+pre": 0.3, "+ba": 0.3, "smoe": 0.3, "buddy": 0.3, "cache_prior": 0.3, "smoe_release": None}


def model_routing(model, windows: np.ndarray, prompt_len: int) -> dict:
  """The model's own routing over the first window, computed exactly: `common.routing_spread` per MoE layer."""
  from moejax import Engine

  w = windows[:1]
  engine = Engine(model, policy="resident", record_routing=True)
  result = engine.generate(w[:, :prompt_len], w.shape[1] - prompt_len, forced_tokens=w[:, prompt_len:])
  return routing_spread(result.routing, model.config.num_experts_per_tok)


def run_policy(model, policy: str, fraction: float, windows: np.ndarray, prompt_len: int) -> dict:
  """One policy with `fraction` of the routed experts on the device (per layer, or of all layers in a shared pool)."""
  from moejax import Engine
  from moejax.eval import speed

  engine = Engine(
    model, policy=policy, alpha=SETTINGS.get(policy, 0.0), cache_fraction=fraction, costs=COSTS, record_routing=True
  )
  m = speed.measure_decode(engine, windows, prompt_len, profiles=EDGE_PROFILES, target_dtype_bytes=2)
  measured = m["measured"]
  measured.pop("per_layer")
  return {
    "policy": policy,
    "alpha": engine.options.alpha,
    "cache_scope": engine.options.cache_scope,
    "cache_slots": engine.num_slots,
    "cache_prior_strength": float(engine.consts.prior_strength),
    **measured,
    "estimated_tpot_s": {p: m["estimate"][p]["tpot_s"] for p in EDGE_PROFILES},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
  parser.add_argument("--windows", type=int, default=4)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--out", default="benchmarks/results/offload_speed.json")
  args = parser.parse_args()

  import moejax
  from moejax.scheduling import POLICIES

  path = build_checkpoint(args.checkpoint)
  host = moejax.load(path, dtype="float32", experts="host")
  windows = heldout_windows(args.windows, args.prompt_len + args.new_tokens)
  spread = model_routing(host, windows, args.prompt_len)
  rows = []
  for fraction in (0.25, 0.5):  # E/4 and E/2: the same bytes per layer or in one shared pool
    for policy in POLICIES:
      rows.append(run_policy(host, policy, 1.0 if policy == "resident" else fraction, windows, args.prompt_len))
      r = rows[-1]
      print(
        f"{policy:12s} slots={r['cache_slots']:3d} alpha={r['alpha']:.2f} hit {r['hit_ratio']:.3f} "
        f"cache {r['cache_hit_ratio']:.3f} Belady {r['belady_hit_ratio']:.3f} distinct {r['distinct_experts']:.1f} "
        f"MB {r['bytes_to_device'] / 1e6:7.1f} cpu {r['cpu_experts']:4d} TPOT {r['tpot_s'] * 1e3:6.2f} ms "
        f"est {r['estimated_tpot_s']['rtx4060ti_16gb'] * 1e3:6.3f} ms",
        flush=True,
      )
  write_report(
    "offload_speed",
    args.out,
    checkpoint="random Qwen2-MoE ~128M (benchmarks/common.py)",
    windows=args.windows,
    prompt_len=args.prompt_len,
    new_tokens=args.new_tokens,
    costs=COSTS,
    estimate_target_dtype_bytes=2,
    model_routing=spread,
    rows=rows,
  )


if __name__ == "__main__":
  main()
