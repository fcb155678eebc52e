"""The paper's cumulative ablation cpu -> +ce -> +cr -> +pre -> +ba at one alpha (resumable JSONL).

  python experiments/ablation.py --config=configs/ablation.py --config.model=/path/to/Qwen1.5-MoE-A2.7B \
      --config.engine.cache_fraction=0.25 --config.out=runs/ablation.jsonl

On a Ray cluster add --config.backend=ray --config.ray.address=auto (README: Sweeps on a cluster).
"""

from moejax.eval.sweep import sweep_config


def get_config():
  c = sweep_config()
  c.alpha = 0.3
  c.out = "runs/ablation.jsonl"
  return c
