"""Decode speed: moejax vs transformers vs llama.cpp vs the memory-bandwidth bound, resident and offloaded.

On the shipped default model and a random ~128M-parameter Qwen2-MoE (8
layers, 32 experts, top-4, hidden 512; built once with transformers and
cached), times in one run, on the same weights and thread count:
- transformers (PyTorch CPU) greedy decode, batch 1 and 4 (TTFT, TPOT);
- moejax `Model.generate` (fully resident; the greedy decode loop is one jitted
  program), batch 1 and 4;
- llama.cpp `llama-bench` on the same checkpoint converted to GGUF f32, batch 1
  (built into a cache folder by `benchmarks/llama_cpp.py`; skipped with
  `--no-llama_cpp`);
- the bandwidth bound: active weight bytes per token / measured copy bandwidth;
- on the 128M model, the offloading `Engine` (resident / lru / smoe at
  cache_slots E/4, E/2, E), now and at `--baseline_commit` (a git worktree
  of that commit timed in a subprocess of the same run: the before/after of
  an engine change).

  python benchmarks/decode_speed.py --out benchmarks/results/decode_speed.json

Prints a table and writes JSON (machine, versions, date). Timings are medians
of steady-state steps (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from common import (
  DEFAULT_CHECKPOINT,
  build_checkpoint,
  copy_bandwidth,
  decode_step_s,
  time_model_generate,
  warm_engine_run,
  write_report,
)


def active_bytes_per_token(config) -> int:
  """Weights read for one decode token: everything but the unselected routed experts."""
  c = config
  per_layer_attn = c.hidden_size * (c.num_heads * c.head_dim * 2 + c.num_kv_heads * c.head_dim * 2)
  shared = 3 * c.hidden_size * c.shared_intermediate_size + c.hidden_size
  router = c.hidden_size * c.num_experts
  routed = c.num_experts_per_tok * c.expert_param_count()
  head = c.vocab_size * c.hidden_size
  return 4 * (c.num_layers * (per_layer_attn + shared + router + routed) + head + c.hidden_size)


def time_transformers(path: str, batch: int, new_tokens: int, threads: int, vocab: int) -> tuple[float, float]:
  """(TTFT, TPOT) of transformers greedy decoding after a 16-token prompt."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  ids = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(0))
  kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None, "attention_mask": torch.ones_like(ids)}
  with torch.no_grad():
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw)
    total = time.perf_counter() - t
  return prefill, (total - prefill) / new_tokens


def time_engine(model, policy: str, slots: int, batch: int, new_tokens: int, alpha: float) -> dict:
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (batch, 16))
  result = warm_engine_run(model, ids, new_tokens, policy=policy, alpha=alpha, cache_slots=slots)
  s = result.stats
  return {
      "policy": policy, "alpha": alpha, "cache_slots": slots, "batch": batch,
      "tpot_s": decode_step_s(result), "hit_ratio": s["hit_ratio"], "bytes_to_device": s["bytes_to_device"],
      "cpu_experts": s["cpu_experts"], "substitution_rate": s["substitution_rate"],
  }


def engine_rows(checkpoint: str, new_tokens: int) -> list[dict]:
  """The offloading Engine at resident / lru / smoe(0.3) for E/4, E/2, E slots, batch 1."""
  import moejax

  resident = moejax.load(checkpoint)
  host = moejax.load(checkpoint, experts="host")
  e = host.config.num_experts
  rows = []
  for policy, alpha, slot_list in (("resident", 0.0, (e,)), ("lru", 0.0, (e // 4, e // 2, e)),
                                   ("smoe", 0.3, (e // 4, e // 2, e))):
    for slots in slot_list:
      rows.append(time_engine(host if policy != "resident" else resident, policy, slots, 1, new_tokens, alpha))
  return rows


def baseline_engine_rows(commit: str, checkpoint: str, new_tokens: int) -> list[dict]:
  """`engine_rows` with moejax from a git worktree of `commit`, in a subprocess (same machine, same run)."""
  root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
  tree = os.path.expanduser(f"~/.cache/moejax/worktrees/{commit}")
  if not os.path.exists(tree):
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", tree, commit], check=True, capture_output=True)
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    subprocess.run([sys.executable, __file__, "--engine_only", f.name, "--checkpoint", checkpoint,
                    "--new_tokens", str(new_tokens)], check=True, env={**os.environ, "PYTHONPATH": tree})
    with open(f.name) as rows:
      return json.load(rows)


def model_rows(name: str, path: str, args, llama: bool) -> dict:
  import jax

  import moejax

  resident = moejax.load(path, dtype="float32")  # compared with transformers and llama.cpp in float32
  c = resident.config
  bound = active_bytes_per_token(c) / args.bandwidth
  rows = []
  tpot_llama = None
  if llama:
    import llama_cpp

    try:
      lr = llama_cpp.bench(llama_cpp.convert(path, moejax.default_model_path()), threads=args.threads,
                           new_tokens=args.new_tokens)
      tpot_llama = lr["tpot_s"]
      rows.append({"impl": "llama.cpp (GGUF f32)", "batch": 1, "ttft_s": lr["ttft_s"], "tpot_s": lr["tpot_s"],
                   "of_bandwidth_bound": bound / lr["tpot_s"], "build": lr["build"]})
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
      print(f"llama.cpp skipped: {err}", flush=True)
  for batch in (1, 4):
    hf_ttft, hf = time_transformers(path, batch, args.new_tokens, args.threads, c.vocab_size)
    ttft, ours = time_model_generate(resident, batch, args.new_tokens)
    rows.append({"impl": "transformers", "batch": batch, "ttft_s": hf_ttft, "tpot_s": hf})
    row = {"impl": "moejax Model.generate (resident)", "batch": batch, "ttft_s": ttft, "tpot_s": ours,
           "vs_transformers": ours / hf, "of_bandwidth_bound": bound / ours}
    if batch == 1 and tpot_llama:
      row["vs_llama_cpp"] = ours / tpot_llama
    rows.append(row)
  params = int(sum(a.size for a in jax.tree.leaves(resident.state))) + len(c.moe_layer_ids) * c.num_experts * (
      c.expert_param_count())
  return {"name": name, "checkpoint": path, "params": params, "active_bytes_per_token": active_bytes_per_token(c),
          "bandwidth_bound_tpot_s": bound, "rows": rows}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--llama_cpp", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--baseline_commit", default=None, help="also time the Engine at this commit (git worktree)")
  parser.add_argument("--engine_only", default=None, help=argparse.SUPPRESS)  # baseline subprocess: write rows here
  parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
  args = parser.parse_args()
  if args.engine_only:
    with open(args.engine_only, "w") as f:
      json.dump(engine_rows(args.checkpoint, args.new_tokens), f)
    return

  import moejax
  import torch
  import transformers

  build_checkpoint(args.checkpoint)
  args.bandwidth = copy_bandwidth()
  models = [model_rows("shipped default model", moejax.default_model_path(), args, llama=args.llama_cpp),
            model_rows("random Qwen2-MoE 128M", args.checkpoint, args, llama=args.llama_cpp)]
  rows = engine_rows(args.checkpoint, args.new_tokens)
  if args.baseline_commit:
    before = baseline_engine_rows(args.baseline_commit, args.checkpoint, args.new_tokens)
    for row, old in zip(rows, before):
      row["tpot_before_s"] = old["tpot_s"]
  report = write_report(
      "decode_speed", args.out, threads=args.threads, new_tokens=args.new_tokens, copy_bandwidth_Bps=args.bandwidth,
      models=models, engine_rows=rows, baseline_commit=args.baseline_commit,
      extra_versions={"transformers": transformers.__version__, "torch": torch.__version__},
  )
  print(f"copy bandwidth {args.bandwidth / 1e9:.1f} GB/s")
  for model in report["models"]:
    print(f"{model['name']}: {model['active_bytes_per_token'] / 1e6:.0f} MB/token, "
          f"bound {model['bandwidth_bound_tpot_s'] * 1e3:.2f} ms/token")
    for r in model["rows"]:
      print(f"  {r['impl']:36s} batch {r['batch']}  TTFT {r['ttft_s'] * 1e3:7.2f} ms  TPOT {r['tpot_s'] * 1e3:7.2f} ms")
  for r in rows:
    before = f"{r['tpot_before_s'] * 1e3:7.2f}" if "tpot_before_s" in r else "      -"
    print(f"  Engine {r['policy']:8s} slots {r['cache_slots']:3d}  TPOT before {before} ms  now "
          f"{r['tpot_s'] * 1e3:7.2f} ms  hit {r['hit_ratio']:.3f}")


if __name__ == "__main__":
  main()
