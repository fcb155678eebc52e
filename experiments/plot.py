"""PNG figures from sweep / ablation JSONL files: accuracy vs alpha, TPOT vs alpha, hit ratio by policy, ablation.

python experiments/plot.py --config=configs/plot.py --config.sweep=FILE --config.ablation=FILE
"""

import os

from absl import app
from ml_collections import config_flags

from moejax.eval import plots, sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/plot.py", lock_config=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  out = lambda name: os.path.join(cfg.out_dir, name)
  written = []
  if cfg.sweep:
    rows = sweep.load_rows(cfg.sweep)
    written += [
      plots.accuracy_vs_alpha(rows, out("accuracy_vs_alpha.png")),
      plots.tpot_vs_alpha(rows, out("tpot_vs_alpha.png"), cfg.profile or None),
      plots.hit_ratio_by_policy(rows, out("hit_ratio_by_policy.png")),
    ]
  if cfg.ablation:
    written.append(plots.ablation_bars(sweep.load_rows(cfg.ablation), out("ablation.png"), cfg.profile or None))
  print("\n".join(written))


if __name__ == "__main__":
  app.run(main)
