"""Decode speed: moejax (resident and offloaded) vs transformers vs the memory-bandwidth bound.

Builds (once, cached) a random ~128M-parameter Qwen2-MoE checkpoint (8 layers,
32 experts, top-4, hidden 512), then times in one run, on the same weights:
- transformers (PyTorch CPU, same thread count) greedy decode, batch 1 and 4;
- moejax `Model.generate` (fully resident, one jitted step), batch 1 and 4;
- moejax `Engine` with policies resident / lru / smoe at cache_slots E/4, E/2, E;
- the bandwidth bound: active weight bytes read per token / measured copy bandwidth.

  python benchmarks/decode_speed.py --out benchmarks/results/decode_speed.json

Prints a table and writes JSON (machine, versions, date). Timings are medians
of steady-state steps (compilation excluded).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from common import BENCH_CONFIG as CONFIG
from common import DEFAULT_CHECKPOINT, build_checkpoint, copy_bandwidth, write_report


def active_bytes_per_token(config) -> int:
  """Weights read for one decode token: everything but the unselected routed experts."""
  c = config
  per_layer_attn = c.hidden_size * (c.num_heads * c.head_dim * 2 + c.num_kv_heads * c.head_dim * 2)
  shared = 3 * c.hidden_size * c.shared_intermediate_size + c.hidden_size
  router = c.hidden_size * c.num_experts
  routed = c.num_experts_per_tok * c.expert_param_count()
  head = c.vocab_size * c.hidden_size
  return 4 * (c.num_layers * (per_layer_attn + shared + router + routed) + head + c.hidden_size)


def time_transformers(path: str, batch: int, new_tokens: int, threads: int) -> float:
  import torch
  import transformers

  torch.set_num_threads(threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  ids = torch.randint(0, CONFIG["vocab_size"], (batch, 16), generator=torch.Generator().manual_seed(0))
  kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
  with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw)
    total = time.perf_counter() - t
  return (total - prefill) / new_tokens


def time_model_generate(model, batch: int, new_tokens: int) -> float:
  ids = np.random.RandomState(0).randint(0, CONFIG["vocab_size"], (batch, 16))
  model.generate(ids, 1)  # compile both cache-length buckets used below
  model.generate(ids, new_tokens + 1)
  t = time.perf_counter()
  model.generate(ids, 1)
  prefill = time.perf_counter() - t
  t = time.perf_counter()
  model.generate(ids, new_tokens + 1)
  return (time.perf_counter() - t - prefill) / new_tokens


def time_engine(model, policy: str, slots: int, batch: int, new_tokens: int, alpha: float) -> dict:
  from moejax.engine import Engine

  engine = Engine(model, policy=policy, alpha=alpha, cache_slots=slots)
  ids = np.random.RandomState(0).randint(0, CONFIG["vocab_size"], (batch, 16))
  engine.generate(ids, new_tokens)  # compile every stage at the measured lengths
  engine.reset()
  result = engine.generate(ids, new_tokens)
  s = result.stats
  steps = [t.wall_s for t in result.trace if t.kind == "decode"][1:]
  return {
      "policy": policy, "alpha": alpha, "cache_slots": slots, "batch": batch,
      "tpot_s": float(np.median(steps)), "hit_ratio": s["hit_ratio"], "bytes_to_device": s["bytes_to_device"],
      "cpu_experts": s["cpu_experts"], "substitution_rate": s["substitution_rate"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
  args = parser.parse_args()

  import jax

  import moejax

  build_checkpoint(args.checkpoint)
  resident = moejax.load(args.checkpoint)
  host = moejax.load(args.checkpoint, experts="host")
  c = resident.config
  e = c.num_experts
  rows = []
  bw = copy_bandwidth()
  bound = active_bytes_per_token(c) / bw
  for batch in (1, 4):
    hf = time_transformers(args.checkpoint, batch, args.new_tokens, args.threads)
    ours = time_model_generate(resident, batch, args.new_tokens)
    rows.append({"impl": "transformers", "batch": batch, "tpot_s": hf})
    rows.append({"impl": "moejax Model.generate (resident, fused)", "batch": batch, "tpot_s": ours,
                 "vs_transformers": ours / hf, "of_bandwidth_bound": bound / ours})
  for policy, alpha, slot_list in (("resident", 0.0, (e,)), ("lru", 0.0, (e // 4, e // 2, e)),
                                   ("smoe", 0.3, (e // 4, e // 2, e))):
    for slots in slot_list:
      r = time_engine(host if policy != "resident" else resident, policy, slots, 1, args.new_tokens, alpha)
      r["impl"] = "moejax Engine"
      rows.append(r)
  report = write_report(
      "decode_speed", args.out,
      model={**CONFIG, "params": int(sum(a.size for a in jax.tree.leaves(resident.state)))
             + len(c.moe_layer_ids) * e * c.expert_param_count()},
      threads=args.threads, new_tokens=args.new_tokens, copy_bandwidth_Bps=bw,
      active_bytes_per_token=active_bytes_per_token(c), bandwidth_bound_tpot_s=bound, rows=rows,
  )
  print(f"copy bandwidth {bw / 1e9:.1f} GB/s, active bytes/token {report['active_bytes_per_token'] / 1e6:.0f} MB, "
        f"bound {bound * 1e3:.2f} ms/token")
  print(f"{'impl':45s} {'policy':9s} {'slots':>5s} {'batch':>5s} {'TPOT ms':>8s} {'hit':>6s}")
  for r in rows:
    print(f"{r['impl']:45s} {r.get('policy', '-'):9s} {r.get('cache_slots', '-')!s:>5s} {r['batch']:>5d} "
          f"{r['tpot_s'] * 1e3:8.2f} {r.get('hit_ratio', float('nan')):6.3f}")


if __name__ == "__main__":
  main()
