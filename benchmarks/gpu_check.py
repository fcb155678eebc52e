"""Accelerator checks of `gpu_check.sh`: device memory of an offloaded decode, and the slot fill's copy speed.

1. Peak device memory (`memory_stats()["peak_bytes_in_use"]`) of an
   `Engine(policy="lru", cache_fraction=0.25)` decode on a model loaded with
   experts in `pinned_host` memory must stay within the non-expert weights +
   the cache slots + one layer of experts (the exact prefill streams a layer's
   experts in) + the KV caches, with 10% slack for XLA's workspace.
2. Host->device GB/s of the engine's slot fill (`offload.slots.write_slots`,
   k experts from the `pinned_host` store into donated device slots) against a
   plain `jax.device_put` of the same experts.

Prints one JSON object; exits 1 if the memory bound is exceeded. On CPU (the
dry run) `memory_stats()` reports nothing and only the copy speeds print.

  python benchmarks/gpu_check.py --checkpoint PATH
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def _nbytes(tree) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


def device_memory(path: str, new_tokens: int) -> dict:
  """Peak device bytes of an lru E/4 decode against its bound (None where the backend keeps no statistics)."""
  import moejax
  from moejax.engine import Engine

  model = moejax.load(path, experts="host", progress=False)
  c = model.config
  engine = Engine(model, policy="lru", cache_fraction=0.25)
  ids = np.arange(16, dtype=np.int32)[None] % c.vocab_size
  engine.generate(ids, new_tokens)
  stats = jax.devices()[0].memory_stats()
  layer_experts = _nbytes(next(w for w in model.experts if w is not None))
  slots = int(0.25 * c.num_experts) / c.num_experts * layer_experts * len(c.moe_layer_ids)
  kv = _nbytes(model.init_caches(1, 16 + new_tokens))
  bound = 1.1 * (_nbytes(model.state) + slots + layer_experts + kv)
  peak = None if not stats else int(stats.get("peak_bytes_in_use", 0))
  return {
    "peak_device_bytes": peak,
    "bound_bytes": int(bound),
    "non_expert_bytes": _nbytes(model.state),
    "slot_bytes": int(slots),
    "layer_expert_bytes": layer_experts,
    "kv_bytes": kv,
    "within_bound": None if peak is None else peak <= bound,
  }


def slot_fill_speed(path: str, repeats: int = 10) -> dict:
  """GB/s of `write_slots` of k experts from the host store against `jax.device_put` of the same experts."""
  import moejax
  from moejax.offload import slots as slot_cache
  from moejax.offload.store import HostExpertStore

  model = moejax.load(path, experts="host", progress=False)
  c = model.config
  layer = HostExpertStore(model.experts).layers[c.moe_layer_ids[0]]
  k = c.num_experts_per_tok
  ids = jnp.arange(k, dtype=jnp.int32)
  buffers = [slot_cache.empty_slots(c, k, model.dtype)]
  nbytes = k * c.expert_param_count() * jnp.dtype(model.dtype).itemsize
  pinned_block = jax.device_put(
    jax.tree.map(lambda a: a[:k], layer), jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  )

  def fill():
    buffers[0] = jax.block_until_ready(slot_cache.write_slots(buffers[0], layer, ids, ids))

  def put():
    jax.block_until_ready(jax.device_put(pinned_block, jax.memory.Space.Device))

  out = {"experts": k, "bytes": nbytes}
  for name, fn in (("slot_fill", fill), ("device_put", put)):
    fn()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    out[f"{name}_GBps"] = nbytes / float(np.median(times)) / 1e9
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--new_tokens", type=int, default=32)
  args = parser.parse_args()
  report = {
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0]),
    "memory": device_memory(args.checkpoint, args.new_tokens),
    "transfer": slot_fill_speed(args.checkpoint),
  }
  print(json.dumps(report, indent=2))
  t = report["transfer"]
  print(
    f"host->device: engine slot fill {t['slot_fill_GBps']:.2f} GB/s, plain device_put {t['device_put_GBps']:.2f} "
    f"GB/s ({t['experts']} experts, {t['bytes'] / 1e6:.1f} MB)"
  )
  m = report["memory"]
  if m["peak_device_bytes"] is None:
    print("peak device memory: not reported by this backend")
  else:
    print(
      f"peak device memory {m['peak_device_bytes'] / 1e6:.1f} MB, bound {m['bound_bytes'] / 1e6:.1f} MB: "
      f"{'ok' if m['within_bound'] else 'EXCEEDED'}"
    )
  sys.exit(0 if m["within_bound"] in (None, True) else 1)


if __name__ == "__main__":
  main()
