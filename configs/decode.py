"""Decode speed of one setup (measured TPOT/TTFT, hit ratio, bytes; estimated edge-GPU TPOT).

  python experiments/decode.py --config=configs/decode.py --config.model=/path/to/Qwen1.5-MoE-A2.7B \
      --config.policy=smoe --config.alpha=0.3 --config.engine.cache_fraction=0.25
"""

from moejax.eval.sweep import base_config


def get_config():
  c = base_config()
  c.policy = "smoe"
  c.alpha = 0.3
  c.out = "runs/decode.json"
  c.trace_out = ""  # also save the step trace here (for `python -m moejax.sim`)
  del c.accuracy
  return c
