"""Accuracy (lm-eval tasks / perplexity) and TPOT over an alpha grid and several policies.

  python experiments/sweep_alpha.py --config=configs/sweep_alpha.py --config.model=DIR [--config.x=y ...]

Appends one JSONL row per (policy, alpha) point to --config.out as each
finishes; rerunning resumes where it stopped and never repeats a finished point.
With --config.backend=ray the points run on a Ray cluster (moejax.eval.distributed).
"""

from absl import app
from ml_collections import config_flags

from moejax.eval import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sweep_alpha.py", lock_config=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  points = [{"policy": policy, "alpha": float(alpha)} for policy in cfg.policies for alpha in cfg.alphas]
  print(sweep.summary_table(sweep.sweep(cfg, points)))


if __name__ == "__main__":
  app.run(main)
