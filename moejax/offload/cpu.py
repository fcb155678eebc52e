"""CPU-assisted expert computation: missed experts run on the host, reading the host store in place."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on

from moejax.models.moe import ExpertWeights, pairwise_experts


@compute_on("device_host")
@functools.partial(jax.jit, static_argnames="act")
def _on_host(x, store, pairs, mix, act):
  # One expert per pair whatever the batch: CPU experts are few by design, and under compute_on the grouped path's
  # constants would be placed in device memory.
  return pairwise_experts(x, store, pairs, mix, act)


def host_experts(
  x: jax.Array, store: ExpertWeights, experts: jax.Array, mix: jax.Array, on_cpu: jax.Array, act: str
) -> jax.Array:
  """Weighted outputs of the (token, expert) pairs marked `on_cpu`, computed on the host.

  Traceable (the engine's jitted step calls it): the activations move to host
  memory, the pairs run under `compute_on("device_host")` on the store's
  weights where they lie, and the result moves back to device memory.

  Args:
    x: `[N, D]` token activations.
    store: the layer's host experts `[E, ...]` (`pinned_host` arrays).
    experts: `[N, k]` expert ids; mix: `[N, k]` mixing weights.
    on_cpu: `[N, k]` bool, pairs computed here.
    act: activation name.

  Returns:
    `[N, D]` float32: sum over the CPU pairs of mix * expert(x) (accumulated in
    float32 and rounded to x's dtype, as the resident path's sum is).
  """
  to_host = lambda a: jax.device_put(a, jax.memory.Space.Host)
  pairs = jnp.where(on_cpu, experts, -1)
  # x keeps its dtype: the products are the resident path's (a float32 x made bfloat16 products ~15% slower)
  y = _on_host(to_host(x), store, to_host(pairs), to_host(mix), act=act)
  return jax.device_put(y, jax.memory.Space.Device).astype(jnp.float32)
