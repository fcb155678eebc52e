"""Per-layer cost of the jitted scheduler next to one MoE layer's own compute.

Times, for T tokens of one decode step of a 64-expert layer (k = 6, S = 16
cache slots): ``route`` (score- and similarity-ranked), ``observe``,
``admit``, the three fused into one jitted scheduling step, and one jitted
MoE layer (router + top-k + a loop over the tokens' selected experts, each
gathered with ``lax.dynamic_index_in_dim``; hidden 2048, expert intermediate
1408, float32, random weights). Prints a table and writes
``benchmarks/results/scheduler_speed.json``.

  python benchmarks/scheduler_speed.py [--tokens 1 4] [--repeats 50]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from moejax import scheduling

NUM_EXPERTS, TOP_K, NUM_SLOTS = 64, 6, 16
HIDDEN, INTERMEDIATE = 2048, 1408
ALPHA = 0.3
RESULTS = pathlib.Path(__file__).parent / "results" / "scheduler_speed.json"


def median_us(fn, *args, repeats: int, warmup: int = 3) -> float:
  """Median wall time of ``fn(*args)`` in microseconds, after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e6


def schedule_step(state, scores, similarity, alpha):
  """route -> admit the misses -> observe, as the engine sequences them."""
  plan = scheduling.route(scores, scheduling.resident_mask(state), k=TOP_K, alpha=alpha, similarity=similarity)
  state, admission = scheduling.admit(
    state, plan.missing, plan.needed, scores.max(axis=0), policy="score", max_loads=TOP_K * scores.shape[0]
  )
  state = scheduling.observe(state, scores, plan.needed)
  return state, plan, admission


def moe_layer(x, router_w, w_gate, w_up, w_down):
  """One routed-expert MoE layer, ``x [T, D] -> [T, D]``.

  A ``fori_loop`` over the ``T * k`` (token, expert) pairs, each gathering
  its expert's weights with ``lax.dynamic_index_in_dim``. (Unrolling the
  loop was 2.5-4x slower on the CPU backend: every gathered slice becomes
  a live temporary.)
  """
  scores = jax.nn.softmax(x @ router_w.T, axis=-1)
  gate, experts = jax.lax.top_k(scores, TOP_K)
  gate = gate / gate.sum(axis=-1, keepdims=True)

  def body(i, out):
    t, j = i // TOP_K, i % TOP_K
    take = functools.partial(jax.lax.dynamic_index_in_dim, index=experts[t, j], keepdims=False)
    h = jax.nn.silu(x[t] @ take(w_gate)) * (x[t] @ take(w_up))
    return out.at[t].add(gate[t, j] * (h @ take(w_down)))

  return jax.lax.fori_loop(0, x.shape[0] * TOP_K, body, jnp.zeros_like(x))


def scheduler_inputs(key, num_tokens):
  k_scores, k_sim = jax.random.split(key)
  scores = jax.nn.softmax(2.0 * jax.random.normal(k_scores, (num_tokens, NUM_EXPERTS)), axis=-1)
  similarity = jax.random.uniform(k_sim, (NUM_EXPERTS, NUM_EXPERTS))
  state = scheduling.init_cache_state(NUM_EXPERTS, NUM_SLOTS, initial_experts=jnp.arange(NUM_SLOTS) * 4)
  return state, scores, similarity


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--layer_repeats", type=int, default=15)
  args = parser.parse_args()

  route = jax.jit(functools.partial(scheduling.route, k=TOP_K))
  observe = jax.jit(scheduling.observe)
  admit = jax.jit(functools.partial(scheduling.admit, policy="score"), static_argnames="max_loads")
  step = jax.jit(schedule_step)
  layer = jax.jit(moe_layer)

  keys = jax.random.split(jax.random.key(0), 5)
  scale = HIDDEN**-0.5
  router_w = scale * jax.random.normal(keys[0], (NUM_EXPERTS, HIDDEN))
  w_gate = scale * jax.random.normal(keys[1], (NUM_EXPERTS, HIDDEN, INTERMEDIATE))
  w_up = scale * jax.random.normal(keys[2], (NUM_EXPERTS, HIDDEN, INTERMEDIATE))
  w_down = INTERMEDIATE**-0.5 * jax.random.normal(keys[3], (NUM_EXPERTS, INTERMEDIATE, HIDDEN))

  rows = []
  for num_tokens in args.tokens:
    state, scores, sim = scheduler_inputs(keys[4], num_tokens)
    resident = scheduling.resident_mask(state)
    alpha = jnp.float32(ALPHA)
    plan = route(scores, resident, alpha=alpha)
    x = jax.random.normal(keys[4], (num_tokens, HIDDEN))
    timed = {
      "route_us": (functools.partial(route, alpha=alpha), scores, resident),
      "route_similarity_us": (functools.partial(route, alpha=alpha, similarity=sim), scores, resident),
      "observe_us": (observe, state, scores, plan.needed),
      "admit_us": (
        functools.partial(admit, max_loads=TOP_K * num_tokens),
        state,
        plan.missing,
        plan.needed,
        scores.max(axis=0),
      ),
      "schedule_step_us": (step, state, scores, sim, alpha),
    }
    row = {"tokens": num_tokens}
    for name, (fn, *fn_args) in timed.items():
      row[name] = median_us(fn, *fn_args, repeats=args.repeats)
    row["moe_layer_us"] = median_us(layer, x, router_w, w_gate, w_up, w_down, repeats=args.layer_repeats)
    row["step_over_layer"] = row["schedule_step_us"] / row["moe_layer_us"]
    rows.append(row)

  columns = list(rows[0])
  print(" ".join(f"{c:>20}" for c in columns))
  for row in rows:
    print(" ".join(f"{row[c]:>20.3f}" if isinstance(row[c], float) else f"{row[c]:>20}" for c in columns))

  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(
    json.dumps(
      {
        "config": {
          "num_experts": NUM_EXPERTS,
          "top_k": TOP_K,
          "num_slots": NUM_SLOTS,
          "hidden": HIDDEN,
          "intermediate": INTERMEDIATE,
          "alpha": ALPHA,
          "dtype": "float32",
          "repeats": args.repeats,
          "layer_repeats": args.layer_repeats,
        },
        "environment": {
          "jax": jax.__version__,
          "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "machine": platform.machine(),
          "cpu_count": os.cpu_count(),
        },
        "results": rows,
      },
      indent=2,
    )
  )
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
