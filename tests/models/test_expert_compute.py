"""Expert and linear products (`routed_experts`, `linear`) against brute-force numpy, float32 and bfloat16."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moejax.models import layers
from moejax.models.moe import ExpertWeights, routed_experts, stored

S, D, F = 7, 24, 10


def _weights(dtype, seed=0) -> ExpertWeights:
  rng = np.random.default_rng(seed)
  return ExpertWeights(*(jnp.asarray(0.3 * rng.standard_normal(s), dtype) for s in ((S, F, D), (S, F, D), (S, D, F))))


def _brute_force(x, w: ExpertWeights, slots, mix) -> np.ndarray:
  """sum over pairs with slot >= 0 of mix * down(silu(gate x) * (up x)), weights `[out, in]`, in float64."""
  g, u, d = (np.asarray(a, np.float64) for a in w)
  x = np.asarray(x, np.float64)
  out = np.zeros(x.shape)
  for n in range(x.shape[0]):
    for j in range(slots.shape[1]):
      s = slots[n, j]
      if s >= 0:
        a = g[s] @ x[n]
        out[n] += mix[n, j] * d[s] @ (a / (1 + np.exp(-a)) * (u[s] @ x[n]))
  return out


@pytest.mark.parametrize("tokens", [3, 80], ids=["one_expert_per_pair", "grouped_by_slot"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, "bf16_bits"], ids=["f32", "bf16", "bf16_held_as_bits"])
def test_routed_experts_match_brute_force(tokens, dtype):
  """Both paths (80 tokens x 2 pairs is over the one-row limit of 7 slots in every dtype) on either kind of stack."""
  held_as_bits = dtype == "bf16_bits"
  dtype = jnp.bfloat16 if held_as_bits else dtype
  rng = np.random.default_rng(1)
  k = 2
  slots = rng.integers(0, S, (tokens, k)).astype(np.int32)
  slots[rng.random((tokens, k)) < 0.2] = -1  # skipped pairs (experts computed elsewhere)
  slots[0] = [3, 3 - S]  # a negative slot is skipped whatever its value
  mix = rng.random((tokens, k)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((tokens, D)), dtype)
  w = _weights(dtype)
  stack = ExpertWeights(*(stored(a) for a in w)) if held_as_bits else w
  assert (stack.gate.dtype == jnp.uint16) == held_as_bits
  got = jax.jit(routed_experts)(x, stack, jnp.asarray(slots), jnp.asarray(mix))
  assert got.dtype == dtype
  want = _brute_force(x, w, slots, mix)
  tol = 1e-5 if dtype == jnp.float32 else 0.02  # bf16: the hidden activations are rounded to 8 bits
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("d_in", [40, 2 * layers._ROW_CHUNK + 17], ids=["narrow", "wide_chunked"])
def test_linear_is_x_times_w_transposed(rows, d_in):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((rows, d_in)).astype(np.float32)
  w = rng.standard_normal((5, d_in)).astype(np.float32)
  got = jax.jit(layers.linear)(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(got), x @ w.T, rtol=1e-5, atol=1e-4)
  # bf16 weights: accumulated in float32, rounded once to bf16 at the end (within one bf16 rounding step).
  wb = w.astype(ml_dtypes.bfloat16)
  xb = x.astype(ml_dtypes.bfloat16)
  got = jax.jit(layers.linear)(jnp.asarray(xb), jnp.asarray(wb))
  assert got.dtype == jnp.bfloat16
  want = xb.astype(np.float64) @ wb.astype(np.float64).T
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8, atol=1e-6)
