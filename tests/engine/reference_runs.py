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

TEXT = ("Now the serpent was more subtle than any animal of the field which Yahweh God had made. "
        "He said to the woman, Has God really said, You shall not eat of any tree of the garden?")
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


def recorded_counters(per_layer: dict[str, list[int]]) -> dict[str, list[int]]:
  """The engine's per-layer counters under the names and meanings recorded in the reference.

  `hits` / `prefetch_used` are the resident / prefetch hits, `pairs_hit` the pairs of both, and the bytes are
  split into demand-and-streamed copies and prefetches. The reference counted a streamed (layerwise)
  layer's experts as `hits` and left its top-score pairs uncounted.
  """
  layers = range(len(per_layer["pairs"]))
  streamed = [per_layer["streamed"][l] > 0 for l in layers]
  pick = lambda name, other: [other[l] if streamed[l] else per_layer[name][l] for l in layers]
  zeros = [0] * len(streamed)
  return {
      "bytes_to_device": [a - b for a, b in zip(per_layer["bytes_to_device"], per_layer["prefetch_bytes"])],
      "cpu_experts": per_layer["cpu_experts"],
      "cpu_pairs": per_layer["pairs_cpu"],
      "demand_loads": per_layer["demand_loads"],
      "gpu_pairs": [p - c for p, c in zip(per_layer["pairs"], per_layer["pairs_cpu"])],
      "hits": pick("resident_hits", per_layer["prefetch_hits"]),
      "pairs": per_layer["pairs"],
      "pairs_hit": [a + b for a, b in zip(per_layer["pairs_resident"], per_layer["pairs_prefetch"])],
      "pairs_top": pick("pairs_top", zeros),
      "pairs_top_hit": pick("pairs_top_hit", zeros),
      "prefetch_bytes": per_layer["prefetch_bytes"],
      "prefetch_used": pick("prefetch_hits", zeros),
      "prefetched": per_layer["prefetched"],
      "prefetched_selected": per_layer["prefetched_selected"],
      "prefetched_top": per_layer["prefetched_top"],
      "substituted": per_layer["substituted"],
  }


def run(model, policy: str, view=recorded_counters) -> dict:
  """Tokens, log-probs and per-layer statistics of both runs under `policy` at a quarter of the experts."""
  data = inputs()
  engine = Engine(model, policy=policy, alpha=ALPHA, cache_fraction=0.25, costs=COSTS)
  forced = engine.generate(data["prompt"], data["forced"].shape[1], forced_tokens=data["forced"])
  engine.reset()
  free = engine.generate(data["batch"], 8, data["mask"])
  return {
      name: {"tokens": r.tokens.tolist(), "logprobs": np.round(r.logprobs, 6).tolist(),
             "per_layer": view(r.stats["per_layer"])}
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
