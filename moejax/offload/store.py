"""Host expert store: every routed expert of every MoE layer, in page-locked host memory.

Weights are stacked per layer as `[E, D, F]` / `[E, F, D]` JAX arrays in the
`pinned_host` memory kind. The engine's jitted step reads them in place: a
copy into the device cache slices one expert from the store and moves it to
device memory (`moejax.offload.slots.fill_slots`; a DMA transfer on a GPU),
and CPU experts compute on the host directly from it
(`moejax.offload.cpu.host_experts`). The store never keeps an expert on the
device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from moejax.models.moe import ExpertWeights


class HostExpertStore:
  """Routed experts of all layers on the host.

  Attributes:
    layers: per model layer, `ExpertWeights` of `pinned_host` arrays `[E, ...]`,
      or None for dense layers.
  """

  def __init__(self, experts: Sequence[ExpertWeights | None], device=None):
    device = device or jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    self.layers = [None if w is None else jax.device_put(ExpertWeights(*w), pinned) for w in experts]

