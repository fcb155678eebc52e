"""Smallest alpha whose fitted TPOT meets a budget, from a sweep file (SPEC section 7).

  python experiments/choose_alpha.py --config=configs/choose_alpha.py --config.sweep=runs/sweep_alpha.jsonl \
      --config.budget_ms=40 --config.tpot=rtx3080ti_12gb
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.sweep = "runs/sweep_alpha.jsonl"
  c.policy = "smoe"
  c.budget_ms = 50.0
  c.tpot = "measured"  # or a hardware profile name: fit that profile's estimated TPOT
  c.degree = 2
  return c
