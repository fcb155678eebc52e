"""Similarity matrices [L, E, E] of a checkpoint, one .npz per source (for Engine(similarity=...)).

  python experiments/similarity.py --config=configs/similarity.py --config.model=/path/to/Qwen1.5-MoE-A2.7B \
      --config.out_dir=runs/similarity
"""

import ml_collections

from moejax.eval.tasks import PARAGRAPHS_PATH


def get_config():
  c = ml_collections.ConfigDict()
  c.model = ""
  c.tokenizer = ""
  c.dtype = "float32"
  c.sources = ("router", "weight", "output", "coactivation")
  c.calibration_file = PARAGRAPHS_PATH  # UTF-8 text; its first num_sequences * seq_len tokens
  c.num_sequences = 4
  c.seq_len = 64
  c.new_tokens = 16  # greedy decode steps recorded for co-activation
  c.out_dir = "runs/similarity"
  return c
