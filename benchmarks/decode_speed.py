"""Decode speed of the resident model: moejax vs transformers vs llama.cpp vs the memory-bandwidth bound.

On the shipped default model and a random ~128M-parameter Qwen2-MoE (8
layers, 32 experts, top-4, hidden 512; built once with transformers and
cached), times in one run, on the same weights and thread count:
- transformers (PyTorch CPU) greedy decode, batch 1 and 4 (TTFT, TPOT);
- moejax `Model.generate` (fully resident; the greedy decode loop is one jitted
  program), batch 1 and 4;
- llama.cpp `llama-bench` on the same checkpoint converted to GGUF f32, batch 1
  (built into a cache folder by `benchmarks/llama_cpp.py`; skipped with
  `--no-llama_cpp`);
- the bandwidth bound: the weight bytes a token reads / the measured bandwidth
  of reading that many bytes; a figure above 100% of it means the benchmark
  counts fewer bytes than are read, and the script stops.

The offloading Engine's policies are measured by `offload_speed.py` (routing
that moves) and at real expert sizes by `scale.py`.

  python benchmarks/decode_speed.py --out benchmarks/results/decode_speed.json

Prints a table and writes JSON (machine, versions, date). Timings are medians
of steady-state steps (compilation excluded).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from common import DEFAULT_CHECKPOINT, build_checkpoint, time_model_generate, write_report


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


def read_bandwidth(nbytes: int, repeats: int = 7) -> float:
  """Bytes/s of reading `nbytes` of float32 once (a jitted sum over them), the fastest of `repeats`.

  Sized like the weights one token reads, the buffer sits in the caches where
  those weights would: the bound it gives is the best case for reading them.
  """
  import jax
  import jax.numpy as jnp

  x = jnp.ones(nbytes // 4, jnp.float32)
  total = jax.jit(jnp.sum)
  jax.block_until_ready(total(x))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(total(x))
    best = min(best, time.perf_counter() - t)
  return nbytes / best


def model_rows(name: str, path: str, args, llama: bool) -> dict:
  import jax

  import moejax

  resident = moejax.load(path, dtype="float32")  # compared with transformers and llama.cpp in float32
  c = resident.config
  bandwidth = read_bandwidth(active_bytes_per_token(c))
  bound = active_bytes_per_token(c) / bandwidth
  rows = []
  tpot_llama = None
  if llama:
    import llama_cpp

    try:
      lr = llama_cpp.bench(
        llama_cpp.convert(path, moejax.default_model_path()), threads=args.threads, new_tokens=args.new_tokens
      )
      tpot_llama = lr["tpot_s"]
      rows.append(
        {
          "impl": "llama.cpp (GGUF f32)",
          "batch": 1,
          "ttft_s": lr["ttft_s"],
          "tpot_s": lr["tpot_s"],
          "of_bandwidth_bound": bound / lr["tpot_s"],
          "build": lr["build"],
        }
      )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
      print(f"llama.cpp skipped: {err}", flush=True)
  for batch in (1, 4):
    hf_ttft, hf = time_transformers(path, batch, args.new_tokens, args.threads, c.vocab_size)
    ttft, ours = time_model_generate(resident, batch, args.new_tokens)
    rows.append({"impl": "transformers", "batch": batch, "ttft_s": hf_ttft, "tpot_s": hf})
    row = {
      "impl": "moejax Model.generate (resident)",
      "batch": batch,
      "ttft_s": ttft,
      "tpot_s": ours,
      "vs_transformers": ours / hf,
      "of_bandwidth_bound": bound / ours,
    }
    if batch == 1 and tpot_llama:
      row["vs_llama_cpp"] = ours / tpot_llama
    rows.append(row)
  params = int(sum(a.size for a in jax.tree.leaves(resident.state))) + len(c.moe_layer_ids) * c.num_experts * (
    c.expert_param_count()
  )
  for row in rows:
    if row.get("of_bandwidth_bound", 0) > 1:
      raise RuntimeError(
        f"{row['impl']} on {name} ran at {row['of_bandwidth_bound']:.0%} of the read-bandwidth "
        "bound: the benchmark counts fewer bytes than are read, or timed something else."
      )
  return {
    "name": name,
    "checkpoint": path,
    "params": params,
    "active_bytes_per_token": active_bytes_per_token(c),
    "read_bandwidth_Bps": bandwidth,
    "bandwidth_bound_tpot_s": bound,
    "rows": rows,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--llama_cpp", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
  args = parser.parse_args()

  import torch
  import transformers

  import moejax

  build_checkpoint(args.checkpoint)
  models = [
    model_rows("shipped default model", moejax.default_model_path(), args, llama=args.llama_cpp),
    model_rows("random Qwen2-MoE 128M", args.checkpoint, args, llama=args.llama_cpp),
  ]
  report = write_report(
    "decode_speed",
    args.out,
    threads=args.threads,
    new_tokens=args.new_tokens,
    models=models,
    extra_versions={"transformers": transformers.__version__, "torch": torch.__version__},
  )
  for model in report["models"]:
    print(
      f"{model['name']}: {model['active_bytes_per_token'] / 1e6:.0f} MB/token read at "
      f"{model['read_bandwidth_Bps'] / 1e9:.1f} GB/s: bound {model['bandwidth_bound_tpot_s'] * 1e3:.2f} ms/token"
    )
    for r in model["rows"]:
      print(f"  {r['impl']:36s} batch {r['batch']}  TTFT {r['ttft_s'] * 1e3:7.2f} ms  TPOT {r['tpot_s'] * 1e3:7.2f} ms")


if __name__ == "__main__":
  main()
