"""The cumulative ablation cpu -> +ce -> +cr -> +pre -> +ba at one alpha, resumable like the alpha sweep.

python experiments/ablation.py --config=configs/ablation.py --config.model=DIR [--config.x=y ...]
"""

from absl import app
from ml_collections import config_flags

from moejax.eval import sweep
from moejax.scheduling import ABLATION

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/ablation.py", lock_config=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  print(sweep.summary_table(sweep.sweep(cfg, [{"policy": policy, "alpha": float(cfg.alpha)} for policy in ABLATION])))


if __name__ == "__main__":
  app.run(main)
