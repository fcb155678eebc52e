"""smoe vs smoe_release vs the baselines, per-layer caches and one shared pool, under one accounting.

  python experiments/compare_policies.py --config=configs/compare_policies.py --config.model=DIR [--config.x=y ...]

Appends one JSONL row per (policy, alpha, cache_scope) point to --config.out as each finishes (resumable); each row
holds the hit ratios by class, bytes, CPU experts, the oracle bounds at the same cache size and the accuracy.
"""

from absl import app
from ml_collections import config_flags

from moejax.eval import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/compare_policies.py", lock_config=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  points = [
    {"policy": policy, "alpha": float(alpha), "cache_scope": scope}
    for scope in cfg.scopes
    for policy, alpha in cfg.points
  ]
  print(sweep.summary_table(sweep.sweep(cfg, points)))


if __name__ == "__main__":
  app.run(main)
