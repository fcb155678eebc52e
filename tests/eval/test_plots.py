"""Figures from sweep rows (synthetic rows, no model)."""

import pytest

from moejax.eval import plots


def row(policy, alpha, tpot, hit):
  return {
    "point": {"policy": policy, "alpha": alpha},
    "setup": {},
    "result": {
      "speed": {
        "measured": {"tpot_s": tpot, "hit_ratio": hit},
        "estimate": {"rtx3080ti_12gb": {"label": "estimate", "tpot_s": tpot / 3}},
      },
      "accuracy": {
        "tasks": {"moejax_capitals": {"acc,none": 0.5 - alpha / 10}},
        "perplexity": {"perplexity": 9 + alpha},
      },
    },
  }


def test_plots_write_pngs(tmp_path):
  rows = [row(p, a, 0.02 - a / 100, 0.6 + a / 2) for p in ("smoe", "buddy") for a in (0.0, 0.2, 0.4)]
  ablation = [row(p, 0.3, t, 0.7) for p, t in (("+cr", 0.02), ("cpu", 0.05), ("+ce", 0.03))]
  paths = [
    plots.accuracy_vs_alpha(rows, str(tmp_path / "a.png")),
    plots.tpot_vs_alpha(rows, str(tmp_path / "t.png"), "rtx3080ti_12gb"),
    plots.hit_ratio_by_policy(rows, str(tmp_path / "h.png")),
    plots.ablation_bars(ablation, str(tmp_path / "ab.png"), "rtx3080ti_12gb"),
  ]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no estimate for profile"):
    plots.tpot_vs_alpha(rows, str(tmp_path / "x.png"), "nonexistent")
