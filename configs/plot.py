"""PNG figures from sweep and ablation JSONL files.

  python experiments/plot.py --config=configs/plot.py --config.sweep=runs/sweep_alpha.jsonl \
      --config.ablation=runs/ablation.jsonl --config.out_dir=runs/plots
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.sweep = "runs/sweep_alpha.jsonl"  # "" to skip
  c.ablation = "runs/ablation.jsonl"  # "" to skip
  c.profile = "rtx3080ti_12gb"  # estimated TPOT shown beside the measured one; "" for none
  c.out_dir = "runs/plots"
  return c
