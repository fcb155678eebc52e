"""Accuracy and TPOT over an alpha grid for several policies (one JSONL row per point, resumable).

  python experiments/sweep_alpha.py --config=configs/sweep_alpha.py --config.model=/path/to/Qwen1.5-MoE-A2.7B \
      --config.engine.cache_fraction=0.25 --config.out=runs/sweep_alpha.jsonl

On a Ray cluster add --config.backend=ray --config.ray.address=auto (README: Sweeps on a cluster).
"""

from moejax.eval.sweep import sweep_config


def get_config():
  c = sweep_config()
  c.policies = ("smoe", "buddy", "cache_prior")  # policies with an alpha; lru / mrs / cpu are alpha-free baselines
  c.alphas = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
  c.out = "runs/sweep_alpha.jsonl"
  return c
