"""Re-estimate a saved trace on a hardware profile and print the JSON summary.

    python -m moejax.sim TRACE.json --profile rtx3080ti_12gb --target_dtype_bytes 2

TRACE.json is a file written by `moejax.sim.save_trace`. The output is
labelled "estimate".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from moejax.sim.estimator import estimate_tpot, summarize
from moejax.sim.profiles import PROFILES
from moejax.sim.trace import load_trace


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moejax.sim", description=__doc__.splitlines()[0])
  parser.add_argument("trace", help="trace JSON written by moejax.sim.save_trace")
  parser.add_argument(
    "--profile", action="append", choices=sorted(PROFILES), help="hardware profile (repeatable; default: all)"
  )
  parser.add_argument(
    "--target_dtype_bytes",
    type=int,
    default=None,
    help="re-express weights in this width on the target (2 = fp16/bf16)",
  )
  parser.add_argument("--timelines", action="store_true", help="include per-layer timelines")
  parser.add_argument("--out", default=None, help="write the JSON here instead of stdout")
  args = parser.parse_args(argv)

  trace = load_trace(args.trace)
  results = {
    name: summarize(estimate_tpot(trace, name, target_dtype_bytes=args.target_dtype_bytes), timelines=args.timelines)
    for name in (args.profile or sorted(PROFILES))
  }
  text = json.dumps({"label": "estimate", "trace": args.trace, "estimates": results}, indent=1)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  else:
    sys.stdout.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
