"""Similarity matrices [L, E, E] of a checkpoint, one .npz per source, for Engine(similarity=...).

  python experiments/similarity.py --config=configs/similarity.py --config.model=DIR [--config.x=y ...]

Sources: router weight cosine, expert weight cosine, expert output similarity
on calibration tokens, co-activation from a routing trace recorded with
Engine(record_routing=True). Load one with moejax.scheduling.load_similarity.
"""

import os

from absl import app, logging
from ml_collections import config_flags

from moejax.eval import calibration, speed, sweep
from moejax.scheduling import save_similarity

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/similarity.py", lock_config=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  model, tokenizer = sweep.load_setup(cfg)
  ids = speed.text_windows(tokenizer, cfg.calibration_file, cfg.num_sequences, cfg.seq_len)
  os.makedirs(cfg.out_dir, exist_ok=True)
  for i, source in enumerate(cfg.sources):
    logging.info("similarity %d/%d: %s", i + 1, len(cfg.sources), source)
    sim = calibration.build_similarity(model, source, calibration_ids=ids, new_tokens=cfg.new_tokens)
    path = os.path.join(cfg.out_dir, f"{source}.npz")
    save_similarity(
      path,
      sim,
      {
        "model": cfg.model,
        "source": source,
        "calibration_file": cfg.calibration_file,
        "num_sequences": cfg.num_sequences,
        "seq_len": cfg.seq_len,
        "new_tokens": cfg.new_tokens,
      },
    )
    print(f"{source}: {sim.shape} -> {path}")


if __name__ == "__main__":
  app.run(main)
