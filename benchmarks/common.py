"""Shared pieces of the benchmark scripts: the benchmark checkpoint, machine info, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The ~128M-parameter random Qwen2-MoE of the benchmarks: 8 layers, 32 experts, top-4, hidden 512.
BENCH_CONFIG = dict(
    vocab_size=16384, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    shared_expert_intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
    num_experts=32, num_experts_per_tok=4, norm_topk_prob=False, max_position_embeddings=2048,
)
DEFAULT_CHECKPOINT = os.path.expanduser("~/.cache/moejax/bench_qwen2_moe_128m")


def build_checkpoint(path: str = DEFAULT_CHECKPOINT) -> str:
  """Writes the random benchmark checkpoint with transformers (once) and returns its path."""
  if not os.path.exists(os.path.join(path, "config.json")):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(**BENCH_CONFIG)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
  return path


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
  """Bytes/s of a plain numpy copy of a buffer much larger than the caches."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t)
  return nbytes / best


def write_report(name: str, path: str, extra_versions: dict | None = None, **fields) -> dict:
  """Writes a benchmark's JSON with date, machine and versions; returns it."""
  import jax

  report = {
      "benchmark": name,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "jax_device": str(jax.devices()[0])},
      "versions": {"jax": jax.__version__, "python": platform.python_version(), **(extra_versions or {})},
      **fields,
  }
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  return report


def time_model_generate(model, batch: int, new_tokens: int, repeats: int = 3) -> tuple[float, float]:
  """(TTFT, TPOT) of moejax `Model.generate` after a 16-token prompt; the fastest of `repeats` runs."""
  ids = np.random.RandomState(0).randint(0, model.config.vocab_size, (batch, 16))
  model.generate(ids, 1)  # compile both cache-length buckets used below
  model.generate(ids, new_tokens + 1)
  best = (float("inf"), float("inf"))
  for _ in range(repeats):
    t = time.perf_counter()
    model.generate(ids, 1)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, new_tokens + 1)
    best = min(best, (prefill, (time.perf_counter() - t - prefill) / new_tokens), key=lambda r: r[1])
  return best


def warm_engine_run(model, prompt: np.ndarray, new_tokens: int, repeats: int = 3, **engine_kwargs):
  """`Engine(model, **engine_kwargs).generate(prompt, new_tokens)` after one compiling run, from a reset cache.

  Of `repeats` measured runs returns the one with the fastest median decode step: this machine's
  noise slows whole runs, not single steps.
  """
  from moejax.engine import Engine

  engine = Engine(model, **engine_kwargs)
  engine.generate(prompt, new_tokens)  # compile every stage at the measured lengths
  runs = []
  for _ in range(repeats):
    engine.reset()
    runs.append(engine.generate(prompt, new_tokens))
  return min(runs, key=decode_step_s)


def decode_step_s(result) -> float:
  """Median steady decode step of a `GenerationResult` (the first decode step excluded)."""
  return float(np.median([t.wall_s for t in result.trace if t.kind == "decode"][1:]))
