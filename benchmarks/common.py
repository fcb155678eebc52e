"""Shared pieces of the benchmark scripts: the benchmark checkpoint, machine info, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CACHE = os.path.expanduser("~/.cache/moejax")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELDOUT = os.path.join(ROOT, "third_party", "world_english_bible", "heldout.txt")

# The ~128M-parameter random Qwen2-MoE of the benchmarks: 8 layers, 32 experts, top-4, hidden 512.
BENCH_CONFIG = dict(
  model_type="qwen2_moe",
  vocab_size=16384,
  hidden_size=512,
  intermediate_size=1024,
  moe_intermediate_size=256,
  shared_expert_intermediate_size=1024,
  num_hidden_layers=8,
  num_attention_heads=8,
  num_key_value_heads=4,
  num_experts=32,
  num_experts_per_tok=4,
  norm_topk_prob=False,
  max_position_embeddings=2048,
)
# v2: built by `build_random_checkpoint` (routing that moves); the v1 checkpoint's routing collapsed.
DEFAULT_CHECKPOINT = os.path.join(CACHE, "bench_qwen2_moe_128m_v2")

# Embedding standard deviation of the random benchmark checkpoints. With HF's default init (0.02 everywhere) the
# token embedding is ~40x smaller than an attention output (a D-wide sum of 0.02-scaled products), so every token's
# router input is nearly the context average and the routing collapses onto a few experts. At 1.0 the current token
# dominates the residual stream, as it does in trained models (checked by `routing_spread`: on the A2.7B shape 48-55 of
# 60 experts per layer over 48 tokens, reuse 0.05-0.13, against k / E = 0.07 for independent draws).
EMBED_STD = 1.0


def build_random_checkpoint(
  path: str, config: dict, dtype: str = "float32", seed: int = 0, embed_std: float = EMBED_STD
) -> str:
  """Writes a random HF checkpoint with transformers' `save_pretrained` (once) and returns its path.

  Args:
    path: output directory; nothing is done if it holds a config.json.
    config: transformers config fields, with `model_type`.
    dtype: "float32" or "bfloat16", the stored dtype.
    seed: torch seed of the random weights.
    embed_std: standard deviation of the token embedding (see `EMBED_STD`).
  """
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  import torch
  import transformers

  torch.manual_seed(seed)
  fields = {k: v for k, v in config.items() if k != "model_type"}
  hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
  with torch.no_grad():
    model.get_input_embeddings().weight.normal_(0.0, embed_std)
  tmp = path + ".tmp"
  model.save_pretrained(tmp)
  del model
  os.replace(tmp, path)
  return path


def build_checkpoint(path: str = DEFAULT_CHECKPOINT) -> str:
  """The random ~128M benchmark checkpoint (`BENCH_CONFIG`, float32), built once."""
  return build_random_checkpoint(path, BENCH_CONFIG, "float32")


def heldout_windows(num: int, length: int) -> np.ndarray:
  """`[num, length]` consecutive windows of the shipped held-out text, tokenised with the shipped model's tokenizer.

  The same tokens as `moejax.eval.speed.text_windows` on that file, without importing moejax (and jax): the
  transformers cases of `scale.py` measure their own process's memory.
  """
  import transformers

  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(ROOT, "moejax", "assets", "default_moe"))
  with open(HELDOUT, encoding="utf-8") as f:
    ids = tokenizer.encode(f.read(), add_special_tokens=False)
  if len(ids) < num * length:
    raise ValueError(f"{HELDOUT} has {len(ids)} tokens, fewer than {num} windows of {length}.")
  return np.asarray(ids[: num * length], np.int32).reshape(num, length)


def routing_spread(routing: list[dict], k: int) -> dict[str, dict]:
  """How much routing moves, from an engine run's `GenerationResult.routing` (batch 1).

  Args:
    routing: per step {MoE layer: `LayerRouting`} (`record_routing=True`).
    k: experts per token.

  Returns per MoE layer, over the run's tokens (prompt, then decode):
  "distinct" experts used, and "reuse", the mean share of a token's k experts
  that the token before also used (1.0: routing that repeats itself; about
  k / E for independent draws).
  """
  out = {}
  for layer in sorted({l for step in routing for l in step}):
    seq = np.concatenate([np.asarray(step[layer].experts) for step in routing if layer in step])  # [T, k]
    shared = [len(set(seq[t].tolist()) & set(seq[t - 1].tolist())) / k for t in range(1, len(seq))]
    out[str(layer)] = {"distinct": len(np.unique(seq)), "reuse": float(np.mean(shared))}
  return out


def best_time(fn, repeats: int) -> float:
  """Fastest of `repeats` timed calls of `fn` (seconds), after one untimed warm-up / compiling call."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def write_report(name: str, path: str, extra_versions: dict | None = None, **fields) -> dict:
  """Writes a benchmark's JSON with date, machine and versions; returns it."""
  import jax

  report = {
    "benchmark": name,
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "machine": {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpus": os.cpu_count(),
      "jax_device": str(jax.devices()[0]),
    },
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
