"""Figures from sweep / ablation JSONL files (`moejax.eval.sweep`): accuracy and TPOT vs alpha,
hit ratio by policy, cumulative ablation. Each function saves one PNG and returns its path."""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moejax.eval.sweep import accuracy_metrics, tpot_of
from moejax.scheduling import ABLATION

Row = Mapping[str, Any]


def _by_policy(rows: Sequence[Row]) -> dict[str, list[Row]]:
  groups = collections.defaultdict(list)
  for row in rows:
    groups[row["point"]["policy"]].append(row)
  return {p: sorted(rs, key=lambda r: r["point"]["alpha"]) for p, rs in groups.items()}


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def accuracy_vs_alpha(rows: Sequence[Row], path: str) -> str:
  """One panel per accuracy metric (lm-eval task/metric, perplexity), one line per policy."""
  metrics = sorted({m for row in rows for m in accuracy_metrics(row)})
  if not metrics:
    raise ValueError("the rows hold no accuracy metrics (run the sweep with tasks or a perplexity file).")
  cols = min(4, len(metrics))
  rows_n = -(-len(metrics) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
  for ax in axes.flat[len(metrics) :]:
    ax.set_visible(False)
  for ax, metric in zip(axes.flat, metrics):
    for policy, rs in _by_policy(rows).items():
      pts = [(r["point"]["alpha"], accuracy_metrics(r)[metric]) for r in rs if metric in accuracy_metrics(r)]
      ax.plot(*zip(*pts), marker="o", label=policy)
    ax.set(xlabel="alpha", title=metric)
    ax.title.set_fontsize("small")
  axes[0][0].legend()
  return _save(fig, path)


def tpot_vs_alpha(rows: Sequence[Row], path: str, profile: str | None = None) -> str:
  """Measured TPOT per policy, and beside it the estimate on `profile` (labelled estimate) if given."""
  sources = ["measured"] + ([profile] if profile else [])
  fig, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 3.2), squeeze=False)
  for ax, source in zip(axes[0], sources):
    for policy, rs in _by_policy(rows).items():
      ax.plot([r["point"]["alpha"] for r in rs], [tpot_of(r, source) * 1e3 for r in rs], marker="o", label=policy)
    ax.set(
      xlabel="alpha",
      ylabel="TPOT (ms)",
      title="measured (this machine)" if source == "measured" else f"estimate: {source}",
    )
  axes[0][0].legend()
  return _save(fig, path)


def hit_ratio_by_policy(rows: Sequence[Row], path: str) -> str:
  """Decode expert-cache hit ratio, grouped bars: one group per policy, one bar per alpha."""
  groups = _by_policy(rows)
  alphas = sorted({r["point"]["alpha"] for r in rows})
  width = 0.8 / len(alphas)
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(groups)), 3.2))
  for j, alpha in enumerate(alphas):
    ratios = [
      next((r["result"]["speed"]["measured"]["hit_ratio"] for r in rs if r["point"]["alpha"] == alpha), np.nan)
      for rs in groups.values()
    ]
    ax.bar(np.arange(len(groups)) + j * width, ratios, width, label=f"alpha={alpha:g}")
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, list(groups))
  ax.set(ylabel="hit ratio", ylim=(0, 1))
  ax.legend(fontsize="small")
  return _save(fig, path)


def ablation_bars(rows: Sequence[Row], path: str, profile: str | None = None) -> str:
  """TPOT of each cumulative ablation step (`ABLATION` order): measured, and the estimate on `profile`."""
  order = {name: i for i, name in enumerate(ABLATION)}
  rows = sorted(rows, key=lambda r: order.get(r["point"]["policy"], len(order)))
  sources = ["measured"] + ([profile] if profile else [])
  fig, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 3.2), squeeze=False)
  names = [r["point"]["policy"] for r in rows]
  for ax, source in zip(axes[0], sources):
    ax.bar(names, [tpot_of(r, source) * 1e3 for r in rows])
    ax.set(ylabel="TPOT (ms)", title="measured (this machine)" if source == "measured" else f"estimate: {source}")
  return _save(fig, path)
