"""Host expert store: every routed expert of every MoE layer, in page-locked host memory.

Weights are stacked per layer as gate/up `[E, F, D]`, down `[E, D, F]` JAX
arrays in the `pinned_host` memory kind (bfloat16 as uint16 bits, `moe.stored`). The engine's jitted step reads them
in place: a copy into the device cache slices one expert from the store and
moves it to device memory (`moejax.offload.slots.fill_slots`; a DMA transfer
on a GPU), and CPU experts compute on the host directly from it
(`moejax.offload.cpu.host_experts`). The store never keeps an expert on the
device.

`moejax.load(path, experts="host")` writes the experts straight into such
arrays; the store then wraps them as they are (no second copy), so a model
and the engine built on it share one copy of the experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.models.moe import ExpertWeights, as_stored


class HostExpertStore:
  """Routed experts of all layers on the host.

  Attributes:
    layers: per model layer, `ExpertWeights` of `pinned_host` arrays `[E, ...]`,
      or None for dense layers.
  """

  def __init__(self, experts: Sequence[ExpertWeights | None], device=None):
    device = device or jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")

    def place(a):  # arrays already pinned on this device are kept, not copied
      if np.dtype(a.dtype) == jnp.bfloat16:  # its bits, viewed on the host: one copy into pinned memory below
        a = as_stored(np.asarray(a))
      return a if isinstance(a, jax.Array) and a.sharding == pinned else jax.device_put(a, pinned)

    self.layers = [None if w is None else ExpertWeights(*(place(a) for a in w)) for w in experts]
