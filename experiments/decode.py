"""Decode speed of one setup: measured TPOT / TTFT / hit ratio / bytes, and estimated edge-GPU TPOT.

  python experiments/decode.py --config=configs/decode.py --config.model=DIR [--config.x=y ...]

Prints a summary and writes JSON to --config.out (the estimates are labelled "estimate").
"""

import datetime
import json
import os

from absl import app, logging
from ml_collections import config_flags

from moejax.engine import Engine
from moejax.eval import sweep
from moejax.sim import save_trace

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/decode.py", lock_config=True)


def main(argv):
  del argv
  cfg = _CONFIG.value
  sweep.check_config(cfg)
  model, tokenizer = sweep.load_setup(cfg)
  engine = Engine(model, policy=cfg.policy, alpha=cfg.alpha, **sweep.engine_options(cfg.engine))
  result = sweep.measure_speed(engine, tokenizer, cfg.speed)
  trace = result.pop("trace")
  for path in (cfg.out, cfg.trace_out):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if cfg.trace_out:
    save_trace(cfg.trace_out, trace)
    logging.info("trace written to %s", cfg.trace_out)
  report = {
    "experiment": "decode",
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "config": cfg.to_dict(),
    **result,
  }
  with open(cfg.out, "w") as f:
    json.dump(report, f, indent=1)
  m = result["measured"]
  print(
    f"{cfg.policy} alpha={cfg.alpha}: TPOT {m['tpot_s'] * 1e3:.2f} ms, TTFT {m['ttft_s'] * 1e3:.2f} ms (measured), "
    f"hit ratio {m['hit_ratio']:.3f}, substitution {m['substitution_rate']:.3f}, "
    f"{m['bytes_to_device'] / 1e6:.2f} MB to device, {m['cpu_experts']} CPU experts"
  )
  for name, est in result["estimate"].items():
    print(f"  estimate {name}: TPOT {est['tpot_s'] * 1e3:.2f} ms, TTFT {est['ttft_s'] * 1e3:.2f} ms")
  print(f"written to {cfg.out}")


if __name__ == "__main__":
  app.run(main)
