"""Decode speed of one engine setup: measured TPOT/TTFT and statistics, plus edge-GPU estimates.

Wall-clock numbers are measurements on this machine (on a CPU-only machine
they measure our own overheads, not PCIe). The `estimate` part replays the
run's exact per-step schedule on hardware profiles (`moejax.sim`); it is
always labelled "estimate".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from moejax.engine import Engine
from moejax.engine.stats import RunStats
from moejax.eval.tokenizer import file_tokens
from moejax.sim import estimate_tpot
from moejax.sim.oracle import routing_bounds

# Headline statistics kept from `RunStats.summary` (decode steps unless named otherwise).
HEADLINE = (
  "tpot_s",
  "decode_steps",
  "pairs",
  "pair_classes",
  "hit_ratio",
  "cache_hit_ratio",
  "hit_ratio_top",
  "hit_ratio_low",
  "substitution_rate",
  "bytes_to_device",
  "prefetch_bytes",
  "wasted_prefetch_bytes",
  "prefill_bytes_to_device",
  "cpu_experts",
  "cpu_pairs",
  "demand_loads",
  "prefetch_loads",
  "prefetch_hits",
  "prefetch_accuracy_top",
  "prefetch_accuracy_selected",
)


def text_windows(tokenizer, path: str, num: int, length: int) -> np.ndarray:
  """`[num, length]` token windows: consecutive chunks of a UTF-8 text file."""
  tokens = file_tokens(tokenizer, path)
  if len(tokens) < num * length:
    raise ValueError(
      f"{path} has {len(tokens)} tokens, fewer than num_prompts * (prompt_len + new_tokens) = "
      f"{num * length}; use a longer text or fewer / shorter windows."
    )
  return np.asarray(tokens[: num * length], np.int32).reshape(num, length)


def routing_figures(run: RunStats, engine: Engine) -> dict[str, float]:
  """How the decode's routing moved, and how far the policy is from the best cache (needs `record_routing`).

  distinct_experts: mean over MoE layers of the distinct experts computed
  over the decode; reuse_rate: of the experts a layer computed in a decode
  step, the share it had also computed in the previous step of the same call;
  belady_hit_ratio / substitution_bound_hit_ratio: the oracle bounds
  (`moejax.sim.oracle.routing_bounds`) on the pair hit ratio of this run's
  routing at the engine's cache size, each call starting from the slots its
  prefill left. The bounds cap `cache_hit_ratio` of policies without prefetch
  (a prefetch brings experts in outside the replayed schedule); they are 0
  without slots (cpu) and NaN for policies without a cache to bound
  (resident, layerwise).
  """
  kinds = [t.kind for t in run.trace]
  segments = []
  for first, resident in run.decode_starts:
    last = first
    while last < len(kinds) and kinds[last] == "decode":
      last += 1
    segments.append((run.routing[first:last], resident))
  distinct = {l: set() for l in engine.config.moe_layer_ids}
  reused = computed = 0
  for steps, _ in segments:
    for prev, step in zip([None, *steps], steps):
      for l, r in step.items():
        experts = set(np.unique(r.experts).tolist())
        distinct[l] |= experts
        if prev is not None:
          reused += len(experts & set(np.unique(prev[l].experts).tolist()))
          computed += len(experts)
  out = {
    "distinct_experts": float(np.mean([len(v) for v in distinct.values()])),
    "reuse_rate": reused / computed if computed else float("nan"),
  }
  hits = {"belady_hit_ratio": 0.0, "substitution_bound_hit_ratio": 0.0}
  if not engine.spec.cache or engine.spec.layerwise:  # resident / whole layers streamed: no cache to bound
    return out | {key: float("nan") for key in hits}
  if engine.num_slots == 0:  # nothing can be resident: no cache hits, with or without substitution
    return out | hits
  pairs = 0
  slots = engine.num_slots
  for steps, resident in segments:
    if not steps:
      continue
    bounds = routing_bounds(
      steps, slots, num_experts=engine.config.num_experts, scope=engine.options.cache_scope, initial=resident
    )
    pairs += bounds["pairs"]
    for key in hits:
      hits[key] += bounds[key] * bounds["pairs"]
  return out | {key: value / pairs if pairs else float("nan") for key, value in hits.items()}


def measure_decode(
  engine: Engine,
  windows: np.ndarray,
  prompt_len: int,
  *,
  batch: int = 1,
  profiles: Sequence[str] = (),
  target_dtype_bytes: int | None = None,
  warmup: bool = True,
) -> dict[str, Any]:
  """Prefills `prompt_len` tokens of each window and feeds the rest through the decode path (teacher forcing).

  The decode follows real text (its routing moves), never a repeated greedy
  token; the cache carries over from window to window after one reset.

  Args:
    engine: the setup to measure (its cache is reset first); with
      `record_routing` the result also has `routing_figures`.
    windows: `[P, T + N]` token ids; N tokens are decoded per window.
    prompt_len: T.
    batch: windows decoded together.
    profiles: `moejax.sim.PROFILES` names to estimate TPOT/TTFT on.
    target_dtype_bytes: weight width on the estimated hardware (2 = fp16).
    warmup: decode the first batch once first, so that compilation is not timed.

  Returns:
    {"measured": headline statistics with `tpot_s` / `ttft_s` the median
     decode / prefill step time, `tpot_forward_only_s` (the mean decode step
     without the LM head and sampling, a second run from a reset cache),
     `times_s`, `per_layer`, and the routing figures; "estimate": per profile {label, tpot_s, ttft_s,
     decode_tokens_per_s}; "trace": the run's `StepTrace` list}.
  """
  windows = np.asarray(windows, np.int32)
  if not 0 < prompt_len < windows.shape[1]:
    raise ValueError(f"prompt_len={prompt_len} must leave tokens to decode in windows of {windows.shape[1]}.")

  def decode(run=None, forward_only=False, rows=None):
    if run is None:
      engine.reset()
      run = engine.new_run_stats()
    for i in range(0, len(windows) if rows is None else rows, batch):
      w = windows[i : i + batch]
      engine.generate(
        w[:, :prompt_len],
        w.shape[1] - prompt_len,
        forced_tokens=w[:, prompt_len:],
        run_stats=run,
        forward_only=forward_only,
      )
    return run

  if warmup:
    decode(rows=batch)
    decode(rows=batch, forward_only=True)
  run = decode()
  logging.info("decode: %d windows of %d + %d tokens", len(windows), prompt_len, windows.shape[1] - prompt_len)
  forward_only = decode(forward_only=True).step_s["decode"]
  summary = run.summary()
  measured = {k: summary[k] for k in HEADLINE}
  # Medians: robust to a step that compiles a new shape variant (e.g. a new number of copied experts).
  measured["tpot_s"] = float(np.median(run.step_s["decode"]))
  measured["ttft_s"] = float(np.median(run.step_s["prefill"]))
  # The released code's TPOT: the decoder's forward alone (no LM head, no sampling), every decode step counted.
  measured["tpot_forward_only_s"] = float(np.mean(forward_only))
  measured["times_s"] = summary["times_s"]
  measured["per_layer"] = summary["per_layer"]
  if engine.options.record_routing:
    measured.update(routing_figures(run, engine))
  estimate = {}
  for name in profiles:
    est = estimate_tpot(run.trace, name, target_dtype_bytes=target_dtype_bytes)
    estimate[name] = {
      "label": est.label,
      "tpot_s": est.tpot_s,
      "ttft_s": est.ttft_s,
      "decode_tokens_per_s": est.decode_tokens_per_s,
    }
  return {"measured": measured, "estimate": estimate, "trace": run.trace}
