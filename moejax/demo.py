"""The front-door demo: decode with offloaded experts on the shipped default model.

  python -m moejax.demo [--policy smoe] [--alpha 0.3] [--cache_fraction 0.25] [--prompt "..."]

Loads `moejax.default_model_path()` with routed experts in host memory, keeps
a fraction of each layer's experts in the device cache, decodes greedily under
the chosen policy next to the fully resident model, and prints the text, TPOT,
TTFT, hit ratio, substitution rate and bytes copied.
"""

from __future__ import annotations

import argparse

import numpy as np
import transformers

import moejax
from moejax.engine import Engine


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="Decode with offloaded experts on the shipped default model.")
  parser.add_argument("--model", default=None, help="HF checkpoint directory (default: the shipped model)")
  parser.add_argument("--prompt", default="And God said, Let there be light: and")
  parser.add_argument("--policy", default="smoe")
  parser.add_argument("--alpha", type=float, default=0.3)
  parser.add_argument("--cache_fraction", type=float, default=0.25)
  parser.add_argument("--max_new_tokens", type=int, default=40)
  args = parser.parse_args(argv)

  path = args.model or moejax.default_model_path()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  ids = np.asarray([tokenizer(args.prompt)["input_ids"]], np.int32)
  for policy, alpha, fraction in (("resident", 0.0, None), (args.policy, args.alpha, args.cache_fraction)):
    engine = Engine.from_pretrained(path, policy=policy, alpha=alpha, cache_fraction=fraction)
    engine.generate(ids, args.max_new_tokens)  # compile
    engine.reset()
    result = engine.generate(ids, args.max_new_tokens)
    s = result.stats
    text = tokenizer.decode(result.tokens[0, ids.shape[1] :], skip_special_tokens=True)
    cache = (
      "all experts resident"
      if policy == "resident"
      else f"{engine.num_slots}/{engine.config.num_experts} experts cached per layer"
    )
    print(f"\n== {policy} (alpha={alpha}, {cache})")
    print(f"{args.prompt}{text}")
    print(
      f"TPOT {s['tpot_s'] * 1e3:.2f} ms | TTFT {s['ttft_s'] * 1e3:.1f} ms | hit ratio {s['hit_ratio']:.3f} | "
      f"substitution rate {s['substitution_rate']:.3f} | {s['bytes_to_device'] / 1e6:.1f} MB copied | "
      f"{s['cpu_experts']} experts on CPU"
    )
  print(
    "\n(CPU-only machine: 'device' and host share memory, so TPOT here measures moejax's own overheads; "
    "see benchmarks/offload_speed.py for edge-GPU estimates.)"
  )


if __name__ == "__main__":
  main()
