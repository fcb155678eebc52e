"""Host expert store: every routed expert of every MoE layer, in host memory.

Weights are stacked per layer as `[E, D, F]` / `[E, F, D]` numpy arrays (as
the loader reads them from the checkpoint). With `memory_kind="pinned_host"`
each expert is additionally kept as a JAX array in page-locked host memory,
from which a device copy is a DMA transfer (the fast path on a GPU). The
store never keeps an expert on the device: `to_device` returns fresh device
arrays that the caller writes into its cache slots.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from moejax.models.moe import ExpertWeights

HOST_MEMORY_KINDS = ("numpy", "pinned_host", "unpinned_host")


class HostExpertStore:
  """Routed experts of all layers on the host.

  Attributes:
    layers: per model layer, `ExpertWeights` of numpy arrays `[E, ...]`, or
      None for dense layers.
    memory_kind: "numpy", "pinned_host" or "unpinned_host".
  """

  def __init__(self, experts: Sequence[ExpertWeights | None], memory_kind: str = "numpy", device=None):
    if memory_kind not in HOST_MEMORY_KINDS:
      raise ValueError(f"memory_kind={memory_kind!r}; use one of {HOST_MEMORY_KINDS}.")
    self.memory_kind = memory_kind
    self.device = device or jax.devices()[0]
    self.layers = [None if w is None else ExpertWeights(*(np.asarray(a) for a in w)) for w in experts]
    self._per_expert = None
    self._on_device = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
    if memory_kind != "numpy":
      kind = jax.sharding.SingleDeviceSharding(self.device, memory_kind=memory_kind)
      self._per_expert = [
          None if w is None else [jax.device_put(ExpertWeights(*(a[e] for a in w)), kind) for e in range(len(w.gate))]
          for w in self.layers
      ]

  def num_experts(self, layer: int) -> int:
    return self.layers[layer].gate.shape[0]

  def expert_bytes(self, layer: int) -> int:
    """Bytes of one routed expert of `layer` (gate + up + down)."""
    return sum(a[0].nbytes for a in self.layers[layer])

  def to_device(self, layer: int, experts: Sequence[int]) -> ExpertWeights:
    """Starts copying `experts` `[M]` of `layer` to the device (asynchronous).

    Returns:
      `ExpertWeights` of device arrays `[M, ...]` (numpy store: one transfer
      per projection), or per expert (pinned store: a tuple of M arrays per
      projection, stacked by the consumer).
    """
    experts = np.asarray(experts)
    if self._per_expert is None:
      w = self.layers[layer]
      return jax.device_put(ExpertWeights(*(a[experts] for a in w)), self._on_device)
    blocks = jax.device_put([self._per_expert[layer][e] for e in experts], self._on_device)
    return ExpertWeights(*(tuple(b[i] for b in blocks) for i in range(3)))
