"""Engine runs on the shipped model whose tokens and statistics are pinned by `test_reference.py`.

`python -m tests.engine.reference_runs` records them into `data/engine_reference.json`; run it only when a
change is meant to alter what the engine computes, and say in the commit which values moved and why.
"""

from __future__ import annotations

import json
import os

import numpy as np
import transformers

import moejax
from moejax.engine import Engine
from moejax.scheduling import POLICIES

TEXT = (
  "Now the serpent was more subtle than any animal of the field which Yahweh God had made. "
  "He said to the woman, Has God really said, You shall not eat of any tree of the garden?"
)
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "engine_reference.json")
ALPHA = 0.3
COSTS = "rtx4060ti_16gb"  # fixed split costs: the balance policies' runs repeat exactly


def inputs() -> dict[str, np.ndarray]:
  """A teacher-forced batch-1 run and a free-running batch-2 run with one left-padded row."""
  ids = np.asarray(transformers.AutoTokenizer.from_pretrained(moejax.default_model_path())(TEXT)["input_ids"])
  batch = np.stack([ids[:12], np.concatenate([[0, 0, 0], ids[20:29]])])
  mask = np.ones_like(batch)
  mask[1, :3] = 0
  return {"prompt": ids[None, :12], "forced": ids[None, 12:], "batch": batch, "mask": mask}


def run(model, policy: str) -> dict:
  """Tokens, log-probs and per-layer statistics of both runs under `policy` at a quarter of the experts."""
  data = inputs()
  engine = Engine(model, policy=policy, alpha=ALPHA, cache_fraction=0.25, costs=COSTS)
  forced = engine.generate(data["prompt"], data["forced"].shape[1], forced_tokens=data["forced"])
  engine.reset()
  free = engine.generate(data["batch"], 8, data["mask"])
  return {
    name: {"tokens": r.tokens.tolist(), "logprobs": np.round(r.logprobs, 6).tolist(), "per_layer": r.stats["per_layer"]}
    for name, r in (("forced", forced), ("free", free))
  }


def main():
  model = moejax.load(moejax.default_model_path(), dtype="float32", experts="host")
  out = {policy: run(model, policy) for policy in sorted(POLICIES)}
  with open(REFERENCE, "w") as f:
    json.dump(out, f, sort_keys=True)
  print(f"wrote {REFERENCE} ({len(out)} policies)")


if __name__ == "__main__":
  main()
