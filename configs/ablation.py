"""The paper's cumulative ablation cpu -> +ce -> +cr -> +pre -> +ba at one alpha (resumable JSONL).

  python experiments/ablation.py --config=configs/ablation.py --config.model=/path/to/Qwen1.5-MoE-A2.7B \
      --config.engine.cache_fraction=0.25 --config.out=runs/ablation.jsonl
"""

from moejax.eval.sweep import base_config


def get_config():
  c = base_config()
  c.alpha = 0.3
  c.out = "runs/ablation.jsonl"
  return c
