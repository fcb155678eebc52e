"""Host->device copy bandwidth for expert-sized buffers vs a plain numpy copy.

For one expert and a batch of experts of a given shape, times:
- `np.copyto` of the same bytes (the machine's copy bandwidth: the reference);
- `jax.device_put` of a numpy array, and of a `pinned_host` JAX array;
- the engine's slot fill: `moejax.offload.slots.write_slots`, which slices each
  expert from the `pinned_host` store, moves it to device memory and writes it
  into its slot of a preallocated, donated `[S, ...]` cache inside one jitted
  call (what the fused step does in-graph).

  python benchmarks/transfer.py --out benchmarks/results/transfer.json

On a CPU-only machine "device" and host are the same memory, so this measures
the software path's overhead against memcpy, not a PCIe link.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import best_time, write_report

from moejax.models.moe import ExpertWeights
from moejax.offload import slots as slot_cache
from moejax.offload.store import HostExpertStore


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--ffn", type=int, default=256)
  parser.add_argument("--experts", type=int, default=32)
  parser.add_argument("--slots", type=int, default=16, help="cache slots of the destination buffer")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default="benchmarks/results/transfer.json")
  args = parser.parse_args()
  d, f, e = args.hidden, args.ffn, args.experts
  rng = np.random.default_rng(0)
  layer = ExpertWeights(*(rng.standard_normal(s, np.float32) for s in ((e, f, d), (e, f, d), (e, d, f))))
  device = jax.devices()[0]
  pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
  on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
  rows = []
  for n in (1, 8):
    ids = np.arange(n)
    block = ExpertWeights(*(a[ids] for a in layer))
    nbytes = sum(a.nbytes for a in block)
    dst = ExpertWeights(*(np.empty_like(a) for a in block))
    t_np = best_time(lambda: [np.copyto(o, a) for o, a in zip(dst, block)], args.repeats)
    t_put = best_time(lambda: jax.block_until_ready(jax.device_put(block, device)), args.repeats)
    host_block = jax.device_put(block, pinned)
    t_pinned = best_time(lambda: jax.block_until_ready(jax.device_put(host_block, on_device)), args.repeats)
    store = HostExpertStore([layer]).layers[0]
    buffers = [ExpertWeights(*(jnp.zeros((args.slots, *a.shape[1:]), a.dtype) for a in layer))]
    experts, slots = jnp.asarray(ids, jnp.int32), jnp.arange(n, dtype=jnp.int32)

    def fill():
      buffers[0] = jax.block_until_ready(slot_cache.write_slots(buffers[0], store, experts, slots))

    t_fill = best_time(fill, args.repeats)
    filled = [np.asarray(a)[:n] for a in buffers[0]]
    if not all(np.array_equal(f, a) for f, a in zip(filled, block)):
      raise AssertionError("the slot fill did not copy the experts it was given")
    for path, t in (
      ("numpy copyto", t_np),
      ("device_put(numpy)", t_put),
      ("device_put(pinned_host)", t_pinned),
      ("engine slot fill (write_slots)", t_fill),
    ):
      rows.append(
        {"experts": n, "bytes": nbytes, "path": path, "seconds": t, "GBps": nbytes / t / 1e9, "vs_numpy": t_np / t}
      )
  write_report("transfer", args.out, expert_shape={"hidden": d, "ffn": f}, rows=rows)
  print(f"{'experts':>7s} {'MB':>7s} {'path':32s} {'GB/s':>7s} {'of numpy':>8s}")
  for r in rows:
    print(f"{r['experts']:7d} {r['bytes'] / 1e6:7.2f} {r['path']:32s} {r['GBps']:7.2f} {r['vs_numpy']:8.2f}")


if __name__ == "__main__":
  main()
