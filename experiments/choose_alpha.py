"""Smallest alpha whose fitted TPOT(alpha) meets a budget, from a sweep file (SPEC section 7).

  python experiments/choose_alpha.py --config=configs/choose_alpha.py --config.sweep=FILE --config.budget_ms=40

Fits a polynomial to the policy's (alpha, TPOT) rows (measured, or a profile's
estimate with --config.tpot=PROFILE) and prints the choice as JSON.
"""

import json

from absl import app
from ml_collections import config_flags

from moejax.eval import alpha as alpha_lib
from moejax.eval import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/choose_alpha.py", lock_config=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  rows = [r for r in sweep.load_rows(cfg.sweep) if r["point"]["policy"] == cfg.policy]
  if not rows:
    raise SystemExit(f"{cfg.sweep} has no rows of policy {cfg.policy!r}.")
  alphas = [r["point"]["alpha"] for r in rows]
  tpots = [sweep.tpot_of(r, cfg.tpot) for r in rows]
  choice = alpha_lib.choose_alpha(alphas, tpots, cfg.budget_ms / 1e3, degree=cfg.degree)
  print(
    json.dumps(
      {
        "policy": cfg.policy,
        "tpot": cfg.tpot,
        "budget_ms": cfg.budget_ms,
        "points": [{"alpha": a, "tpot_ms": t * 1e3} for a, t in zip(alphas, tpots)],
        "alpha": choice.alpha,
        "predicted_tpot_ms": choice.predicted_tpot_s * 1e3,
        "fit_coefficients": choice.coefficients,
        "degree": choice.degree,
      },
      indent=1,
    )
  )
  if choice.alpha is None:
    print(
      f"No measured alpha meets {cfg.budget_ms} ms; the fastest predicted is {choice.predicted_tpot_s * 1e3:.2f} ms."
    )


if __name__ == "__main__":
  app.run(main)
