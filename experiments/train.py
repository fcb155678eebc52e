r"""Trains a small fine-grained MoE with optax, checkpointing with orbax, and exports it in the HF format.

  nice -n 10 python experiments/train.py --config=configs/train_default.py \
      --workdir=/tmp/moejax_train --config.export_dir=moejax/assets/default_moe
"""

from absl import app, flags
from ml_collections import config_flags

from moejax.train.trainer import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_default.py", "Training configuration.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/moejax_train", "Tokenizer, checkpoints and logs; resumed if present.")


def main(argv):
  del argv
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
