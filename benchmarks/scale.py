"""Scale benchmark: real expert sizes, bf16 and f32, moejax against transformers and llama.cpp.

Random checkpoints with the shapes of real MoE models (vocabulary cut to the
shipped tokenizer's 4096), written once by transformers' `save_pretrained`
into `~/.cache/moejax/scale/` (`benchmarks/common.py: build_random_checkpoint`,
routing that moves):
- `qwen_a27b_2l` / `qwen_a27b_4l`: Qwen1.5-MoE-A2.7B (hidden 2048, 60 experts
  of width 1408, top-4, sigmoid-gated shared expert of 5632) with 2 / 4 layers;
- `dsv2_lite_2l`: DeepSeek-V2-Lite (MLA, 64 experts of width 1408, top-6, 2
  shared experts) with 2 layers, both MoE (the real model's first layer is
  dense).
Each in bfloat16 and float32. Every case runs in its own process (its peak
RSS is its own) and measures, decode driven by teacher-forced held-out text
(batch 1, a 16-token prompt, 32 forced tokens):
- moejax `Engine` (public API): resident (experts loaded to the device),
  lru and smoe (alpha 0.3) at cache_fraction 0.25 (experts loaded to the host
  with `Engine.from_pretrained`'s `experts="host"` load): load time, peak RSS,
  compile time (first `generate` minus a warm one), TTFT, TPOT, hit ratio,
  bytes copied, and the routing's distinct experts per layer and reuse;
- transformers (PyTorch CPU, same threads): load time, peak RSS, TTFT, TPOT
  (a forward per forced token on its KV cache);
- llama.cpp `llama-bench` on GGUF f32 / bf16 conversions (built by
  `benchmarks/llama_cpp.py`; the GGUF is deleted afterwards unless
  `--keep_gguf`);
- the prompt pass (one forward of batch 1 and 4 x 16 and 128 tokens): moejax
  `Model.forward` and transformers, on the 2-layer A2.7B shape;
- `--paired` rounds on the 2-layer A2.7B shape: moejax resident and
  llama.cpp alternated (a process each), and moejax resident, lru and smoe
  alternated in one process; the goals against llama.cpp and against
  resident are the medians of the rounds' ratios.
Goals of the issue are evaluated from the rows and written with the JSON
(`benchmarks/results/scale.json`); `benchmarks/report.py` writes the README
section. moejax's processes run with the documented XLA:CPU flag
(`moejax.models.compile`) so that the engine's programs get it too.

  python benchmarks/scale.py                      # everything (about 20 minutes here, checkpoints built)
  python benchmarks/scale.py --models qwen_a27b_2l --dtypes bfloat16 --no-llama_cpp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import CACHE, ROOT, build_random_checkpoint, heldout_windows, routing_spread, write_report

SCALE_CACHE = os.path.join(CACHE, "scale")
VOCAB = 4096  # the shipped tokenizer's: held-out text drives the decode, llama.cpp converts with it
_QWEN_A27B = {
  "model_type": "qwen2_moe",
  "vocab_size": VOCAB,
  "hidden_size": 2048,
  "intermediate_size": 5632,
  "moe_intermediate_size": 1408,
  "shared_expert_intermediate_size": 5632,
  "num_attention_heads": 16,
  "num_key_value_heads": 16,
  "num_experts": 60,
  "num_experts_per_tok": 4,
  "norm_topk_prob": False,
  "max_position_embeddings": 8192,
  "rope_theta": 1000000.0,
  "rms_norm_eps": 1e-6,
  "qkv_bias": True,
  "tie_word_embeddings": False,
}
MODELS = {
  "qwen_a27b_2l": {**_QWEN_A27B, "num_hidden_layers": 2},
  "qwen_a27b_4l": {**_QWEN_A27B, "num_hidden_layers": 4},
  "dsv2_lite_2l": {
    "model_type": "deepseek_v2",
    "vocab_size": VOCAB,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 0,
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
  },
  # A few MB, for the dry run of gpu_check.sh (not one of the measured shapes).
  "tiny": {
    **_QWEN_A27B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
  },
}
MEASURED = ("qwen_a27b_2l", "qwen_a27b_4l", "dsv2_lite_2l")
POLICIES = ("resident", "lru", "smoe")
DTYPES = ("bfloat16", "float32")
PROMPT, NEW = 16, 32
PROMPT_SHAPES = ((1, 16), (1, 128), (4, 16), (4, 128))
CACHE_FRACTION = 0.25  # lru and smoe: E/4 slots per MoE layer
SMOE_ALPHA = 0.3
PROMPT_RUNS = 5  # timed prompt passes per shape, after a compiling / warm-up call
XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def checkpoint(model: str, dtype: str) -> str:
  """The random checkpoint of `model` stored in `dtype` (built once), with the shipped tokenizer's files."""
  path = build_random_checkpoint(os.path.join(SCALE_CACHE, f"{model}_{dtype}"), MODELS[model], dtype)
  shipped = os.path.join(ROOT, "moejax", "assets", "default_moe")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    if not os.path.exists(os.path.join(path, name)):
      shutil.copy(os.path.join(shipped, name), path)
  return path


# ----------------------------------------------------------------------------
# Cases, each run in its own process (`--case`); they print one JSON object.
# ----------------------------------------------------------------------------


def _memory() -> dict[str, int]:
  with open("/proc/self/status") as f:
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}


def _reset_peak() -> int:
  """Resets the peak resident size (VmHWM) to the current one and returns that."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _memory()["VmRSS"]


def _alpha(policy: str) -> float:
  return SMOE_ALPHA if policy == "smoe" else 0.0


def case_engine(path: str, dtype: str, policy: str) -> dict:
  """moejax `Engine` with `policy` (resident: experts loaded to the device; else host, `CACHE_FRACTION`)."""
  start = _memory()["VmRSS"]
  import jax
  import transformers  # noqa: F401  (moejax resolves config.json through it: counted as an import)

  import moejax
  from moejax.engine import Engine

  jax.numpy.zeros(1).block_until_ready()
  ids = heldout_windows(1, PROMPT + NEW)
  base = _reset_peak()
  prompt, forced = ids[:, :PROMPT], ids[:, PROMPT:]
  t = time.perf_counter()
  if policy == "resident":
    engine = Engine(moejax.load(path, dtype=dtype, progress=False), policy="resident", record_routing=True)
  else:
    engine = Engine.from_pretrained(
      path, dtype=dtype, policy=policy, alpha=_alpha(policy), cache_fraction=CACHE_FRACTION, record_routing=True
    )
  load_s = time.perf_counter() - t
  load_peak = _memory()["VmHWM"] - base
  t = time.perf_counter()
  engine.generate(prompt, NEW, forced_tokens=forced)
  first_s = time.perf_counter() - t
  runs = []
  for _ in range(3):
    engine.reset()
    t = time.perf_counter()
    result = engine.generate(prompt, NEW, forced_tokens=forced)
    runs.append((time.perf_counter() - t, result))
  warm_s, result = min(runs, key=lambda r: r[1].stats["tpot_s"])
  s = result.stats
  model = engine.model
  weights = sum(a.nbytes for a in jax.tree.leaves(model.state)) + sum(
    a.nbytes for w in model.experts if w is not None for a in w
  )
  c = model.config
  slots = engine.num_slots if policy != "resident" else 0
  cache = slots * c.expert_param_count() * jax.numpy.dtype(model.dtype).itemsize * len(c.moe_layer_ids)
  return {
    "impl": "moejax",
    "policy": policy,
    "alpha": _alpha(policy),
    "load_s": load_s,
    "import_rss_bytes": base - start,
    "peak_load_rss_bytes": load_peak,
    "peak_rss_bytes": _memory()["VmHWM"] - base,
    "weight_bytes": weights,
    "device_cache_bytes": cache,
    "compile_s": first_s - warm_s,
    "ttft_s": s["ttft_s"],
    "tpot_s": s["tpot_s"],
    "tpot_runs_s": [r.stats["tpot_s"] for _, r in runs],
    "hit_ratio": s["hit_ratio"],
    "bytes_to_device": s["bytes_to_device"],
    "decode_steps": s["decode_steps"],
    "cpu_experts": s["cpu_experts"],
    "routing": routing_spread(result.routing, model.config.num_experts_per_tok),
  }


def case_transformers(path: str, dtype: str, threads: int) -> dict:
  """transformers: TTFT (prompt forward) and TPOT (median forward per forced token on the KV cache)."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  ids = torch.from_numpy(heldout_windows(1, PROMPT + NEW).astype(np.int64))
  base = _reset_peak()
  t = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
  load_s = time.perf_counter() - t
  load_peak = _memory()["VmHWM"] - base

  def decode():
    with torch.no_grad():
      t = time.perf_counter()
      out = model(ids[:, :PROMPT], use_cache=True)
      ttft = time.perf_counter() - t
      cache, steps = out.past_key_values, []
      for i in range(PROMPT, PROMPT + NEW - 1):
        t = time.perf_counter()
        cache = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).past_key_values
        steps.append(time.perf_counter() - t)
    return ttft, float(np.median(steps[1:]))

  decode()  # warm-up
  runs = [decode() for _ in range(3)]
  ttft, tpot = min(runs, key=lambda r: r[1])
  return {
    "impl": "transformers",
    "load_s": load_s,
    "peak_load_rss_bytes": load_peak,
    "peak_rss_bytes": _memory()["VmHWM"] - base,
    "ttft_s": ttft,
    "tpot_s": tpot,
    "tpot_runs_s": [r[1] for r in runs],
  }


def case_prompt(path: str, dtype: str, impl: str, threads: int) -> dict:
  """The prompt pass (one forward) at `PROMPT_SHAPES`: each shape's `PROMPT_RUNS` times and their median."""
  ids = {shape: heldout_windows(*shape) for shape in PROMPT_SHAPES}
  if impl == "moejax":
    import moejax

    model = moejax.load(path, dtype=dtype, progress=False)
    run = lambda x: np.asarray(model.forward(x))
  else:
    import torch
    import transformers

    torch.set_num_threads(threads)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()

    def run(x):
      with torch.no_grad():
        return hf(torch.from_numpy(x.astype(np.int64))).logits

  median, runs = {}, {}
  for (batch, length), x in ids.items():
    run(x)
    times = []
    for _ in range(PROMPT_RUNS):
      t = time.perf_counter()
      run(x)
      times.append(time.perf_counter() - t)
    median[f"{batch}x{length}"], runs[f"{batch}x{length}"] = float(np.median(times)), times
  return {"impl": impl, "prompt_s": median, "prompt_runs_s": runs}


def case_llama(path: str, dtype: str, threads: int, keep: bool) -> dict:
  import llama_cpp

  outtype = {"float32": "f32", "bfloat16": "bf16"}[dtype]
  gguf = llama_cpp.convert(path, os.path.join(ROOT, "moejax", "assets", "default_moe"), outtype=outtype)
  try:
    r = llama_cpp.bench(gguf, threads=threads, prompt_tokens=PROMPT, new_tokens=NEW)
  finally:
    if not keep:
      os.remove(gguf)
  return {"impl": f"llama.cpp (GGUF {outtype})", "ttft_s": r["ttft_s"], "tpot_s": r["tpot_s"], "build": r["build"]}


def case_paths(path: str, dtype: str, repeats: int = 25) -> dict:
  """Per-byte speed of the three ways a step gets k experts' work done, alternated in one process (medians).

  resident: `routed_experts` of one token's k pairs from device arrays; cpu:
  `host_experts` of the same pairs under compute_on("device_host"), reading
  the `pinned_host` store; copy: `write_slots` of the k experts into slots;
  memcpy: numpy copies of k experts of one stack into a slot array (the
  machine's copy speed for the same bytes: on a CPU host and device share one
  memory, so an offloaded decode pays at least its copied bytes at this speed).
  """
  import jax
  import jax.numpy as jnp

  import moejax
  from moejax.models.compile import compiler_options
  from moejax.models.moe import routed_experts
  from moejax.offload import slots as slot_cache
  from moejax.offload.cpu import host_experts
  from moejax.offload.store import HostExpertStore

  model = moejax.load(path, dtype=dtype, experts="host", progress=False)
  c = model.config
  store = HostExpertStore(model.experts).layers[c.moe_layer_ids[0]]
  resident = jax.device_put(store, jax.memory.Space.Device)
  k = c.num_experts_per_tok
  ids = jnp.asarray(np.linspace(0, c.num_experts - 1, k).astype(np.int32))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, c.hidden_size)), model.dtype)
  mix = jnp.full((1, k), 1.0 / k, jnp.float32)
  options = compiler_options()
  experts = jax.jit(routed_experts, static_argnames="act", compiler_options=options)
  cpu = jax.jit(host_experts, static_argnames="act", compiler_options=options)
  slots = [slot_cache.empty_slots(c, int(CACHE_FRACTION * c.num_experts), model.dtype)]

  def fill():
    slots[0] = slot_cache.write_slots(slots[0], store, ids, jnp.arange(k, dtype=jnp.int32))
    return slots[0]

  stacks = [np.asarray(a) for a in store]  # host copies: a numpy source and destination of the store's shapes
  dst = [np.empty((int(CACHE_FRACTION * c.num_experts), *a.shape[1:]), a.dtype) for a in stacks]

  order = list(enumerate(np.asarray(ids)))  # (slot, expert)

  def memcpy():
    for a, b in zip(stacks, dst):
      for slot, e in order:
        b[slot] = a[e]

  paths = {
    "resident": lambda: experts(x, resident, ids[None], mix, act=c.hidden_act),
    "cpu": lambda: cpu(x, store, ids[None], mix, jnp.ones((1, k), bool), act=c.hidden_act),
    "copy": fill,
    "memcpy": memcpy,
  }
  times = {name: [] for name in paths}
  for fn in paths.values():
    jax.block_until_ready(fn())
  for _ in range(repeats):
    for name, fn in paths.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  nbytes = k * c.expert_param_count() * jnp.dtype(model.dtype).itemsize
  return {
    "impl": "expert paths",
    "experts": k,
    "bytes": nbytes,
    "GBps": {name: nbytes / float(np.median(t)) / 1e9 for name, t in times.items()},
    "spread_GBps": {name: [nbytes / max(t) / 1e9, nbytes / min(t) / 1e9] for name, t in times.items()},
  }


def paired_rounds(model: str, dtype: str, threads: int, rounds: int, keep: bool) -> list[dict]:
  """moejax resident decode and llama.cpp's, alternated `rounds` times (the GGUF converted once): one row a round."""
  path, out = checkpoint(model, dtype), []
  for i in range(rounds):
    ours = in_subprocess({"kind": "engine", "policy": "resident", "path": path, "dtype": dtype})
    last = i == rounds - 1
    llama = in_subprocess({"kind": "llama", "path": path, "dtype": dtype, "threads": threads, "keep": keep or not last})
    row = {"model": model, "dtype": dtype, "round": i}
    if "error" in ours or "error" in llama:
      row["error"] = ours.get("error") or llama.get("error")
    else:
      row |= {
        "moejax_tpot_s": ours["tpot_s"],
        "llama_tpot_s": llama["tpot_s"],
        "ratio": ours["tpot_s"] / llama["tpot_s"],
        "load_average": max(ours["load_average"], llama["load_average"]),
      }
    out.append(row)
    print(json.dumps(row), flush=True)
  return out


def case_offload_rounds(path: str, dtype: str, rounds: int) -> dict:
  """Resident, lru and smoe (`CACHE_FRACTION`, as `case_engine`) decode in one process, alternated `rounds` times.

  The machine's speed drifts between the separate cases by more than the
  gap being measured; here the three engines run seconds apart. One entry
  per round: each engine's TPOT and its copied bytes per decode step.
  """
  import moejax
  from moejax.engine import Engine

  prompt, forced = np.split(heldout_windows(1, PROMPT + NEW), [PROMPT], axis=1)
  host = moejax.load(path, dtype=dtype, experts="host", progress=False)  # one host store for both cached engines
  engines = {"resident": Engine(moejax.load(path, dtype=dtype, progress=False), policy="resident")}
  for policy in ("lru", "smoe"):
    engines[policy] = Engine(host, policy=policy, alpha=_alpha(policy), cache_fraction=CACHE_FRACTION)
  for engine in engines.values():  # compiles
    engine.generate(prompt, NEW, forced_tokens=forced)
  out = []
  for i in range(rounds):
    row = {"round": i, "load_average": os.getloadavg()[0]}
    for name, engine in engines.items():
      engine.reset()
      s = engine.generate(prompt, NEW, forced_tokens=forced).stats
      row[f"{name}_tpot_s"] = s["tpot_s"]
      row[f"{name}_bytes_per_step"] = s["bytes_to_device"] / s["decode_steps"]
    out.append(row)
  return {"impl": "moejax", "rounds": out}


def run_case(case: dict) -> dict:
  if case["kind"] == "engine":
    return case_engine(case["path"], case["dtype"], case["policy"])
  if case["kind"] == "transformers":
    return case_transformers(case["path"], case["dtype"], case["threads"])
  if case["kind"] == "prompt":
    return case_prompt(case["path"], case["dtype"], case["impl"], case["threads"])
  if case["kind"] == "paths":
    return case_paths(case["path"], case["dtype"])
  if case["kind"] == "offload_rounds":
    return case_offload_rounds(case["path"], case["dtype"], case["rounds"])
  return case_llama(case["path"], case["dtype"], case["threads"], case["keep"])


def in_subprocess(case: dict) -> dict:
  """Runs `case` in a fresh Python process; returns its row (or the error, on failure)."""
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  if case["kind"] != "transformers":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_FLAGS).strip()
  if case.get("compilation_cache"):
    env["JAX_COMPILATION_CACHE_DIR"] = case["compilation_cache"]
  load = os.getloadavg()[0]  # this machine is shared: the 1-minute load average before the case, as a noise marker
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    return {"error": (errors or [f"exit {proc.returncode}"])[-1].strip()[:300]}
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_average": load}


# ----------------------------------------------------------------------------
# Goals of the issue, from the rows
# ----------------------------------------------------------------------------


def _row(rows, **match):
  for r in rows:
    if all(r.get(k) == v for k, v in match.items()) and "error" not in r:
      return r
  return None


def copy_floor(per_token: float | None, resident_tpot: float | None, paths: dict | None) -> str | None:
  """The least an offloaded decode can take here: resident TPOT + its copied bytes per token at numpy's copy speed."""
  if per_token is None or not (resident_tpot and paths):
    return None
  floor = resident_tpot + per_token / (paths["GBps"]["memcpy"] * 1e9)
  return (
    f"copy floor {floor / resident_tpot:.2f}x: {per_token / 1e6:.0f} MB copied per token at this machine's "
    f"{paths['GBps']['memcpy']:.1f} GB/s numpy copy; the engine's fill runs at {paths['GBps']['copy']:.1f} GB/s"
  )


def _median_of_rounds(ratios: list[float]) -> tuple[float, str]:
  """The median of alternated rounds' ratios, and a note listing them."""
  ratios = sorted(ratios)
  return float(np.median(ratios)), f"{len(ratios)} alternated rounds: " + ", ".join(f"{x:.2f}" for x in ratios)


def goals(
  rows: list[dict], prompt_rows: list[dict], paired_rows: list[dict] = (), offload_rounds: list[dict] = ()
) -> list[dict]:
  """Each goal of the issue with its number and met / not met (None: not measured in this run)."""
  out = []

  def goal(name, value, bound, detail, *compared, note=None):
    """`compared`: the rows a speed ratio comes from; their highest load average is recorded with it.
    `note`: what bounds the value on this machine, when it is not the code (written after it in the README)."""
    loads = [r["load_average"] for r in compared if r and r.get("load_average") is not None]
    out.append(
      {
        "goal": name,
        "value": value,
        "bound": bound,
        "met": None if value is None else value <= bound,
        "detail": detail,
        "load_average": max(loads) if loads else None,
        "note": note,
      }
    )

  for r in rows:
    if r.get("impl") != "moejax" or "error" in r:
      continue
    if r["policy"] == "resident":
      goal(
        f"moejax.load resident peak RSS / weights ({r['model']}, {r['dtype']})",
        r["peak_load_rss_ratio"],
        1.15,
        "peak RSS growth of the load over the weights in the requested dtype",
      )
    elif r["policy"] == "lru":
      goal(
        f"Engine.from_pretrained peak RSS / (checkpoint + device cache) ({r['model']}, {r['dtype']})",
        r["peak_load_rss_ratio"],
        1.15,
        "peak RSS growth of load + engine over checkpoint bytes + device cache",
      )
  for model in sorted({r["model"] for r in rows}):
    bf16, f32 = (_row(rows, model=model, dtype=d, impl="moejax", policy="resident") for d in ("bfloat16", "float32"))
    goal(
      f"resident decode TPOT bf16 / f32 ({model})",
      bf16["tpot_s"] / f32["tpot_s"] if bf16 and f32 else None,
      1.0,
      "a bf16 model decodes at least as fast as the same model in f32",
      bf16,
      f32,
    )
  for dtype, bound_llama in (("float32", 1.2), ("bfloat16", 1.5)):
    res = _row(rows, model="qwen_a27b_2l", dtype=dtype, impl="moejax", policy="resident")
    llama = next(
      (
        r
        for r in rows
        if r.get("model") == "qwen_a27b_2l"
        and r.get("dtype") == dtype
        and str(r.get("impl", "")).startswith("llama.cpp")
        and "error" not in r
      ),
      None,
    )
    hf = _row(rows, model="qwen_a27b_2l", dtype=dtype, impl="transformers")
    tpot = res and res["tpot_s"]
    rounds = [r for r in paired_rows if r["dtype"] == dtype and "error" not in r]
    if rounds:  # the machine's speed drifts between cases: the median of alternated rounds
      value, note = _median_of_rounds([r["ratio"] for r in rounds])
      detail, compared = "batch 1, median of alternated rounds", rounds
    else:
      value, detail, compared, note = tpot / llama["tpot_s"] if tpot and llama else None, "batch 1", [res, llama], None
    goal(f"resident decode TPOT / llama.cpp (qwen_a27b_2l, {dtype})", value, bound_llama, detail, *compared, note=note)
    goal(
      f"resident decode TPOT / transformers (qwen_a27b_2l, {dtype})",
      tpot / hf["tpot_s"] if tpot and hf else None,
      0.8,
      "batch 1",
      res,
      hf,
    )
    paths = _row(rows, model="qwen_a27b_2l", dtype=dtype, impl="expert paths")
    alternated = [r for r in offload_rounds if r["dtype"] == dtype]
    for name in ("lru", "smoe"):
      off = _row(rows, model="qwen_a27b_2l", dtype=dtype, impl="moejax", policy=name)
      if alternated:  # as against llama.cpp: the median of rounds in which the engines alternate
        value, note = _median_of_rounds([r[f"{name}_tpot_s"] / r["resident_tpot_s"] for r in alternated])
        resident = float(np.median([r["resident_tpot_s"] for r in alternated]))
        per_token = float(np.median([r[f"{name}_bytes_per_step"] for r in alternated]))
        detail, compared = (
          "median of alternated rounds in one process; routing per the row's distinct/reuse",
          alternated,
        )
      else:
        value = off["tpot_s"] / tpot if off and tpot else None
        per_token = off["bytes_to_device"] / off["decode_steps"] if off and off["decode_steps"] else None
        resident, note = tpot, None
        detail, compared = "routing per the row's distinct/reuse", [off, res]
      floor = copy_floor(per_token, resident, paths)
      note = "; ".join(n for n in (note, floor) if n) or None
      goal(f"{name} E/4 decode TPOT / resident (qwen_a27b_2l, {dtype})", value, 1.5, detail, *compared, note=note)
  for dtype in DTYPES:
    paths = _row(rows, model="qwen_a27b_2l", dtype=dtype, impl="expert paths")
    goal(
      f"resident experts GB/s / CPU experts GB/s (qwen_a27b_2l, {dtype})",
      paths["GBps"]["resident"] / paths["GBps"]["cpu"] if paths else None,
      1.0,
      "same per-byte speed: <= 1.0 (medians of alternated runs; see the row's spread)",
      paths,
    )
    ours = _row(prompt_rows, dtype=dtype, impl="moejax")
    hf = _row(prompt_rows, dtype=dtype, impl="transformers")
    for shape in (f"{b}x{t}" for b, t in PROMPT_SHAPES):
      goal(
        f"prompt pass {shape} / transformers (qwen_a27b_2l, {dtype})",
        ours["prompt_s"][shape] / hf["prompt_s"][shape] if ours and hf else None,
        1.0,
        "batch x tokens",
        ours,
        hf,
      )
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(MEASURED), help=f"of {sorted(MODELS)}")
  parser.add_argument("--dtypes", default=",".join(DTYPES))
  parser.add_argument("--policies", default=",".join(POLICIES), help="moejax Engine rows")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--llama_cpp", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--prompt", action=argparse.BooleanOptionalAction, default=True, help="the prompt-pass rows")
  parser.add_argument("--keep_gguf", action="store_true")
  parser.add_argument(
    "--paired",
    type=int,
    default=5,
    help="rounds in which moejax resident and llama.cpp decode alternate, and (in one process) moejax resident, "
    "lru and smoe, on qwen_a27b_2l (the machine's speed drifts between cases: the goals against llama.cpp and "
    "resident are the medians of these rounds' ratios)",
  )
  parser.add_argument("--compilation_cache", default=None, help="JAX persistent compilation cache for moejax runs")
  parser.add_argument(
    "--cache_check",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="time compilation of the first resident case from an empty and a filled cache",
  )
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in this process
  parser.add_argument("--out", default="benchmarks/results/scale.json")
  args = parser.parse_args()
  if args.case:
    print(json.dumps(run_case(json.loads(args.case))))
    return

  import torch
  import transformers

  rows, prompt_rows, cache_rows = [], [], []
  for model in args.models.split(","):
    for dtype in args.dtypes.split(","):
      path = checkpoint(model, dtype)
      size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
      base = {"model": model, "dtype": dtype, "checkpoint_bytes": size}
      cases = [
        {"kind": "engine", "policy": p, "compilation_cache": args.compilation_cache} for p in args.policies.split(",")
      ]
      if args.transformers:
        cases.append({"kind": "transformers"})
      if args.llama_cpp:
        cases.append({"kind": "llama", "keep": args.keep_gguf})
      for case in cases:
        row = {**base, **in_subprocess({**case, "path": path, "dtype": dtype, "threads": args.threads})}
        if row.get("impl") == "moejax":
          bound = row["weight_bytes"] if row["policy"] == "resident" else size + row["device_cache_bytes"]
          row["peak_load_rss_ratio"] = row["peak_load_rss_bytes"] / bound
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("routing", "tpot_runs_s")}), flush=True)
      if model == "qwen_a27b_2l":
        row = {**base, **in_subprocess({"kind": "paths", "path": path, "dtype": dtype})}
        rows.append(row)
        print(json.dumps(row), flush=True)
      if args.prompt and model == "qwen_a27b_2l":
        for impl in ("moejax", "transformers"):
          row = {
            **base,
            **in_subprocess({"kind": "prompt", "impl": impl, "path": path, "dtype": dtype, "threads": args.threads}),
          }
          prompt_rows.append(row)
          print(json.dumps(row), flush=True)
  paired_rows = []
  if args.paired and args.llama_cpp and "qwen_a27b_2l" in args.models.split(","):
    for dtype in args.dtypes.split(","):
      paired_rows += paired_rounds("qwen_a27b_2l", dtype, args.threads, args.paired, args.keep_gguf)
  offload_rounds = []
  if args.paired and {"lru", "smoe"} <= set(args.policies.split(",")) and "qwen_a27b_2l" in args.models.split(","):
    for dtype in args.dtypes.split(","):
      path = checkpoint("qwen_a27b_2l", dtype)
      got = in_subprocess({"kind": "offload_rounds", "path": path, "dtype": dtype, "rounds": args.paired})
      for r in got.get("rounds", [{"error": got.get("error")}]):
        offload_rounds.append({"model": "qwen_a27b_2l", "dtype": dtype, **r})
        print(json.dumps(offload_rounds[-1]), flush=True)
  if args.cache_check:  # the persistent compilation cache: the same case twice, from an empty cache
    model, dtype = args.models.split(",")[0], args.dtypes.split(",")[0]
    with tempfile.TemporaryDirectory() as cache_dir:
      for run in ("cold", "warm"):
        case = {
          "kind": "engine",
          "policy": "resident",
          "path": checkpoint(model, dtype),
          "dtype": dtype,
          "compilation_cache": cache_dir,
        }
        row = {"model": model, "dtype": dtype, "compilation_cache": run, **in_subprocess(case)}
        cache_rows.append({k: row.get(k) for k in ("model", "dtype", "compilation_cache", "compile_s", "error")})
        print(json.dumps(cache_rows[-1]), flush=True)
  checks = goals(rows, prompt_rows, paired_rows, [r for r in offload_rounds if "error" not in r])
  for g in checks:
    state = "not measured" if g["met"] is None else ("met" if g["met"] else "NOT MET")
    value = "-" if g["value"] is None else f"{g['value']:.2f}"
    load = "" if g["load_average"] is None else f", load average {g['load_average']:.1f}"
    print(f"{state:12s} {g['goal']}: {value} (bound {g['bound']}{load})")
  write_report(
    "scale",
    args.out,
    threads=args.threads,
    prompt_tokens=PROMPT,
    new_tokens=NEW,
    xla_flags=XLA_FLAGS,
    models=MODELS,
    rows=rows,
    prompt_rows=prompt_rows,
    paired_rows=paired_rows,
    offload_rounds=offload_rounds,
    compilation_cache_rows=cache_rows,
    goals=checks,
    extra_versions={"transformers": transformers.__version__, "torch": torch.__version__},
  )


if __name__ == "__main__":
  main()
