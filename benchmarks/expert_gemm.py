"""One routed expert's three products at a few rows: XLA:CPU (as moejax runs them) against PyTorch.

What a grouped block of the prompt pass costs (`moejax.models.moe._grouped_experts`):
for M rows of one expert (gate and up `[F, D]`, down `[D, F]`, bfloat16 held
as its bits, the A2.7B shape by default), timed per expert over a loop of
`--experts` different experts (so no expert's weights are still in cache):
- "block": the grouped path's loop body, a block of M rows multiplied by its
  expert's weights sliced from the stack (moejax's compiler options);
- "batched": one batched `dot_general` over all the experts `[E, M, D] x [E, F, D]`
  on bfloat16 stacks (read in place: no per-block slice), per expert;
- "torch": PyTorch `F.linear` on the same shapes and threads, per expert.

  python benchmarks/expert_gemm.py --out benchmarks/results/expert_gemm.json

Fastest of `--repeats` runs after a compiling / warm-up one.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from common import best_time, write_report

from moejax.models import moe
from moejax.models.compile import compiler_options


def xla_times(weights: moe.ExpertWeights, rows: int, repeats: int) -> dict[str, float]:
  """Seconds per expert of the block loop and of the batched product, for `rows` rows per expert."""
  n = weights.gate.shape[0]
  d = weights.gate.shape[2]
  xs = jnp.asarray(np.random.default_rng(0).standard_normal((n * rows, d)), jnp.bfloat16)

  jit = jax.jit(compiler_options=compiler_options())  # moejax's own XLA:CPU options, as its programs run

  @jit
  def block(xs, weights):
    def one(b, ys):
      g, u, w = moe.expert(weights, b)
      y = moe._expert_ffn(jax.lax.dynamic_slice_in_dim(xs, b * rows, rows), g, u, w, "silu")
      return jax.lax.dynamic_update_slice_in_dim(ys, y.astype(jnp.float32), b * rows, 0)

    return jax.lax.fori_loop(0, n, one, jnp.zeros(xs.shape, jnp.float32))

  def bdot(x, w):  # x [E, M, in], w [E, out, in] -> [E, M, out]
    return jax.lax.dot_general(x, w, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32).astype(x.dtype)

  @jit
  def batched(xs, weights):  # weights as bfloat16 arrays: the product reads them in place
    g, u, w = weights
    x = xs.reshape(n, rows, d)
    return bdot(jax.nn.silu(bdot(x, g)) * bdot(x, u), w)

  as_bf16 = jax.block_until_ready(moe.values(weights))
  return {
    "block": best_time(lambda: block(xs, weights).block_until_ready(), repeats) / n,
    "batched": best_time(lambda: batched(xs, as_bf16).block_until_ready(), repeats) / n,
  }


def torch_time(shape: tuple[int, int, int], rows: int, threads: int, repeats: int) -> float:
  """Seconds per expert of PyTorch's three `F.linear` products on bfloat16 weights."""
  import torch

  torch.set_num_threads(threads)
  n, f, d = shape
  gen = torch.Generator().manual_seed(0)
  g, u = (torch.randn(n, f, d, generator=gen, dtype=torch.bfloat16) * 0.02 for _ in range(2))
  w = torch.randn(n, d, f, generator=gen, dtype=torch.bfloat16) * 0.02
  x = torch.randn(n, rows, d, generator=gen, dtype=torch.bfloat16)
  linear = torch.nn.functional.linear

  def run():
    with torch.no_grad():
      for b in range(n):
        linear(torch.nn.functional.silu(linear(x[b], g[b])) * linear(x[b], u[b]), w[b])

  return best_time(run, repeats) / n


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--width", type=int, default=1408, help="expert intermediate size")
  parser.add_argument("--experts", type=int, default=30)
  parser.add_argument("--rows", default="8,16,32,64,128")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--out", default="benchmarks/results/expert_gemm.json")
  args = parser.parse_args()

  import torch

  rng = np.random.default_rng(0)
  n, f, d = args.experts, args.width, args.hidden

  def stack(shape):
    return moe.as_stored(jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02, jnp.bfloat16))

  weights = moe.ExpertWeights(stack((n, f, d)), stack((n, f, d)), stack((n, d, f)))
  rows = []
  for m in (int(r) for r in args.rows.split(",")):
    row = {
      "rows": m,
      **xla_times(weights, m, args.repeats),
      "torch": torch_time((n, f, d), m, args.threads, args.repeats),
    }
    row["gflops"] = {k: 3 * 2 * m * d * f / row[k] / 1e9 for k in ("block", "batched", "torch")}
    rows.append(row)
    print(
      f"M={m:4d}  block {row['block'] * 1e3:6.2f} ms  batched {row['batched'] * 1e3:6.2f} ms  "
      f"torch {row['torch'] * 1e3:6.2f} ms per expert",
      flush=True,
    )
  write_report(
    "expert_gemm",
    args.out,
    extra_versions={"torch": torch.__version__},
    shape={"experts": n, "width": f, "hidden": d, "dtype": "bfloat16"},
    threads=args.threads,
    repeats=args.repeats,
    rows=rows,
  )


if __name__ == "__main__":
  main()
