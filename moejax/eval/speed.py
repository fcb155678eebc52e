"""Decode speed of one engine setup: measured TPOT/TTFT and statistics, plus edge-GPU estimates.

Wall-clock numbers are measurements on this machine (on a CPU-only machine
they measure our own overheads, not PCIe). The `estimate` part replays the
run's exact per-step schedule on hardware profiles (`moejax.sim`); it is
always labelled "estimate".
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from absl import logging

from moejax.engine import Engine
from moejax.eval.tokenizer import file_tokens
from moejax.sim import estimate_tpot

# Headline statistics kept from `RunStats.summary` (decode steps unless named otherwise).
HEADLINE = (
    "tpot_s", "decode_steps", "hit_ratio", "hit_ratio_top", "hit_ratio_low", "substitution_rate", "bytes_to_device",
    "prefill_bytes_to_device", "cpu_experts", "cpu_pairs", "demand_loads", "prefetch_loads", "prefetch_accuracy_top",
    "prefetch_accuracy_selected",
)


def text_prompts(tokenizer, path: str, num: int, length: int) -> np.ndarray:
  """`[num, length]` prompts: consecutive token chunks of a UTF-8 text file."""
  tokens = file_tokens(tokenizer, path)
  if len(tokens) < num * length:
    raise ValueError(f"{path} has {len(tokens)} tokens, fewer than num_prompts * prompt_len = {num * length}; "
                     "use a longer text or fewer / shorter prompts.")
  return np.asarray(tokens[: num * length], np.int32).reshape(num, length)


def measure_decode(
    engine: Engine,
    prompts: np.ndarray,
    new_tokens: int,
    *,
    batch: int = 1,
    profiles: Sequence[str] = (),
    target_dtype_bytes: int | None = None,
    warmup: bool = True,
) -> dict[str, Any]:
  """Decodes `new_tokens` after each prompt, `batch` prompts at a time, from an empty cache.

  Args:
    engine: the setup to measure (its cache is reset first).
    prompts: `[P, T]` token ids.
    new_tokens: tokens generated per prompt.
    batch: sequences decoded together.
    profiles: `moejax.sim.PROFILES` names to estimate TPOT/TTFT on.
    target_dtype_bytes: weight width on the estimated hardware (2 = fp16).
    warmup: generate once for the first prompts first, so that compilation is not timed.

  Returns:
    {"measured": headline statistics with `tpot_s` / `ttft_s` the median
     decode / prefill step time, `times_s` and `per_layer`; "estimate": per profile {label, tpot_s, ttft_s,
     decode_tokens_per_s}; "trace": the run's `StepTrace` list}.
  """
  if warmup:
    engine.generate(prompts[:batch], new_tokens)
  engine.reset()
  run = engine.new_run_stats()
  for i in range(0, len(prompts), batch):
    engine.generate(prompts[i : i + batch], new_tokens, run_stats=run)
    logging.info("decode: %d/%d prompts", min(i + batch, len(prompts)), len(prompts))
  summary = run.summary()
  measured = {k: summary[k] for k in HEADLINE}
  # Medians: robust to a step that compiles a new shape variant (e.g. a new number of copied experts).
  measured["tpot_s"] = float(np.median(run.step_s["decode"]))
  measured["ttft_s"] = float(np.median(run.step_s["prefill"]))
  measured["times_s"] = summary["times_s"]
  measured["per_layer"] = summary["per_layer"]
  estimate = {}
  for name in profiles:
    est = estimate_tpot(run.trace, name, target_dtype_bytes=target_dtype_bytes)
    estimate[name] = {"label": est.label, "tpot_s": est.tpot_s, "ttft_s": est.ttft_s,
                      "decode_tokens_per_s": est.decode_tokens_per_s}
  return {"measured": measured, "estimate": estimate, "trace": run.trace}
