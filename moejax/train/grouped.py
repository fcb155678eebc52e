"""Differentiable routed-expert compute for training: sorted, block-padded grouped matmuls.

`moejax.models.moe.routed_experts` is built for inference (a per-pair loop
for decode, `lax.ragged_dot` for prefill); on CPU the gradient of
`ragged_dot` costs about as much as running every expert on every token.
Here the (token, expert) pairs are sorted by expert and each expert's group
is padded to a multiple of `block` rows, so every block of rows belongs to
one expert: the experts run as one batched matmul over blocks with each
block's expert weights gathered `[n_blocks, D, F]`. The result equals
`routed_experts` (no token is dropped); only padding rows are extra work
(at most `E * (block - 1)` rows).

Shapes: N tokens, D hidden, F expert width, E experts, k experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.models.layers import activation
from moejax.models.moe import ExpertWeights


def grouped_experts(
  x: jax.Array, weights: ExpertWeights, experts: jax.Array, mix: jax.Array, act: str = "silu", block: int = 64
) -> jax.Array:
  """Weighted sum of each token's chosen experts.

  Args:
    x: `[N, D]` token activations.
    weights: `ExpertWeights` gate/up `[E, F, D]`, down `[E, D, F]`.
    experts: `[N, k]` int32 expert ids (all valid).
    mix: `[N, k]` mixing weights.
    act: activation name.
    block: rows per block of the grouped matmul.

  Returns:
    `[N, D]` in the dtype of x.
  """
  n, k = experts.shape
  e = weights.gate.shape[0]
  pairs = n * k
  n_blocks = -(-pairs // block) + e  # enough for any assignment: sum_e ceil(c_e / block) <= pairs / block + e
  flat = experts.reshape(-1)
  order = jnp.argsort(flat)
  sorted_experts = flat[order]
  counts = jnp.bincount(flat, length=e)
  padded = -(-counts // block) * block
  padded_end = jnp.cumsum(padded)
  rank = jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[sorted_experts]  # position within the expert's group
  row = (padded_end - padded)[sorted_experts] + rank  # row of each sorted pair in the padded buffer
  token = order // k
  xs = jnp.zeros((n_blocks * block, x.shape[1]), x.dtype).at[row].set(x[token])
  xs = xs.reshape(n_blocks, block, -1)
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(n_blocks) * block, side="right"), e - 1)
  h = activation(act)(jnp.einsum("bnd,bfd->bnf", xs, weights.gate[block_expert]))
  h = h * jnp.einsum("bnd,bfd->bnf", xs, weights.up[block_expert])
  y = jnp.einsum("bnf,bdf->bnd", h, weights.down[block_expert]).reshape(n_blocks * block, -1)
  w = mix.reshape(-1)[order].astype(jnp.float32)
  out = jnp.zeros(x.shape, jnp.float32).at[token].add(w[:, None] * y[row].astype(jnp.float32))
  return out.astype(x.dtype)
