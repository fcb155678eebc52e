"""Offloaded decoding under every policy: TPOT, hit ratio, bytes, CPU experts, cost split, edge-GPU estimates.

On the random ~128M-parameter Qwen2-MoE of `decode_speed.py`, for every
registered policy at cache_slots E/4 and E/2 (smoe family at alpha 0.3,
baselines at alpha 0), decodes twice:
- the engine as users run it (the whole decode one jitted program, copies
  into the cache slots and CPU experts inside it): TPOT (its run time per
  decode step), hit ratio, bytes copied, CPU experts;
- `Engine(profile=True)`: every stage its own jitted call, blocked on and
  timed, giving per decode step the model's own work: attention, experts,
  head, copies, CPU experts and the prefetch predictor.
Staged calls carry their own dispatch and blocking cost, so the overhead is
taken conservatively against the fully fused resident model instead: the
engine's TPOT minus `Model.generate`'s TPOT (same run) minus the copies and
CPU experts of a step. What remains is the scheduler's own compute, the
host's dispatch and read-back, and any fusion the policy's step loses
(goal: under 10% of a step). The estimator's TPOT on the paper's edge GPUs
comes from the same trace (labelled estimates, `moejax.sim`).

  python benchmarks/offload_speed.py --out benchmarks/results/offload_speed.json
"""

from __future__ import annotations

import argparse

import numpy as np

from common import (
  DEFAULT_CHECKPOINT,
  build_checkpoint,
  decode_step_s,
  time_model_generate,
  warm_engine_run,
  write_report,
)

EDGE_PROFILES = ("rtx3080ti_12gb", "rtx4060ti_16gb", "a6000_48gb")
SMOE_FAMILY = ("smoe", "+cr", "+pre", "+ba")


WORK = ("attention", "experts", "head", "copy", "cpu", "prefetch")


def run_policy(model, policy: str, slots: int, alpha: float, prompt: np.ndarray, new_tokens: int) -> dict:
  from moejax.sim import estimate_tpot

  result = warm_engine_run(model, prompt, new_tokens, policy=policy, alpha=alpha, cache_slots=slots)
  step_s = decode_step_s(result)
  staged = warm_engine_run(model, prompt, new_tokens, policy=policy, alpha=alpha, cache_slots=slots,
                           profile=True)
  steps = sum(t.kind == "decode" for t in staged.trace)
  per_step = {name: staged.stats["times_s"].get(name, 0.0) / steps for name in (*WORK, "plan")}
  staged_step = float(np.mean([t.wall_s for t in staged.trace if t.kind == "decode"]))
  s = result.stats
  return {
      "policy": policy, "alpha": alpha, "cache_slots": slots, "tpot_s": step_s, "profiled_step_s": staged_step,
      "hit_ratio": s["hit_ratio"], "substitution_rate": s["substitution_rate"],
      "bytes_to_device": s["bytes_to_device"], "cpu_experts": s["cpu_experts"],
      "prefetch_accuracy_top": s["prefetch_accuracy_top"],
      "stage_s": per_step, "split": {name: per_step[name] / step_s for name in WORK},
      "estimated_tpot_s": {p: estimate_tpot(result.trace, p, target_dtype_bytes=2).tpot_s for p in EDGE_PROFILES},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
  parser.add_argument("--new_tokens", type=int, default=24)
  parser.add_argument("--alpha", type=float, default=0.3)
  parser.add_argument("--out", default="benchmarks/results/offload_speed.json")
  args = parser.parse_args()

  import moejax
  from moejax.scheduling import POLICIES

  path = build_checkpoint(args.checkpoint)
  host = moejax.load(path, experts="host")
  resident = moejax.load(path)
  e = host.config.num_experts
  prompt = np.random.RandomState(0).randint(0, host.config.vocab_size, (1, 16))
  _, fused_model_tpot = time_model_generate(resident, 1, args.new_tokens)
  rows = [run_policy(resident, "resident", e, 0.0, prompt, args.new_tokens)]
  for slots in (e // 4, e // 2):
    for policy in POLICIES:
      if policy == "resident":
        continue
      alpha = args.alpha if policy in SMOE_FAMILY else 0.0
      rows.append(run_policy(host, policy, slots, alpha, prompt, args.new_tokens))
      r = rows[-1]
      print(f"{policy:12s} slots={slots:3d} alpha={alpha:.1f} TPOT {r['tpot_s'] * 1e3:7.2f} ms  "
            f"hit {r['hit_ratio']:.3f}  MB copied {r['bytes_to_device'] / 1e6:7.1f}  cpu {r['cpu_experts']:4d}  "
            f"predictor {r['split']['prefetch']:.0%}", flush=True)
  write_report("offload_speed", args.out, checkpoint="random Qwen2-MoE ~128M (benchmarks/common.py)",
               new_tokens=args.new_tokens, estimate_target_dtype_bytes=2, fused_model_tpot_s=fused_model_tpot,
               rows=rows)


if __name__ == "__main__":
  main()
