"""Dense building blocks: norms, rotary embeddings, attention, gated MLP.

Shapes: B batch, T query tokens, S cache length, D hidden size, H query heads,
K key/value heads, Dh head dim. Linear weights are stored `[out, in]` (the
checkpoints' own layout) and applied by `linear`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.config import MoEConfig

ACTIVATIONS = {
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"Unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def _param(shape, dtype, init=jnp.zeros):
  return nnx.Param(init(shape, dtype))


# XLA:CPU computes a one-row product `x @ w.T` as a loop fused with the read of w (at memory bandwidth, bfloat16
# widened in registers) only while the row is under 16 KB in float32 and nothing (a bias, a sum) is fused into the
# product's output; otherwise it first copies w into a transposed layout, on every call. `linear` splits wider
# rows into chunks of this many inputs.
_ROW_CHUNK = 2048


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
  """x `[..., in]` times w `[out, in]` (transposed): `[..., out]` in x's dtype, accumulated in float32.

  Weights are kept `[out, in]`, the layout in which each output is a dot
  product over contiguous memory: XLA:CPU reads a bfloat16 matrix once and
  widens it on the fly, where the transposed layout `[in, out]` runs ~30x
  slower in bfloat16. A one-row product (decode) is summed over column blocks
  of at most `_ROW_CHUNK` inputs, each kept a separate fused loop by an
  optimization barrier, which also keeps a following bias add or sum out of
  it (either would make XLA copy w transposed first). Several rows (prompts,
  grouped experts) contract the last axes of x and w directly: written as
  `x @ w.T` on a 2-D x, XLA:CPU runs a bfloat16 product through its generic
  loop (~90 GFLOP/s here for 128 x 2048 x 5632) instead of its bfloat16 GEMM
  (~330 GFLOP/s).
  """
  d_in = w.shape[-1]
  if math.prod(x.shape[:-1]) != 1:
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32).astype(x.dtype)
  parts = [
    jnp.matmul(x[..., s : s + _ROW_CHUNK], w[:, s : s + _ROW_CHUNK].T, preferred_element_type=jnp.float32)
    for s in range(0, d_in, _ROW_CHUNK)
  ]
  return sum(jax.lax.optimization_barrier(parts)).astype(x.dtype)


class Linear(nnx.Module):
  """y = x @ weight.T (+ bias); weight `[out, in]` (see `linear`)."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool = False, dtype=jnp.float32):
    self.weight = _param((d_out, d_in), dtype)
    self.bias = _param((d_out,), dtype) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = linear(x, self.weight[...])
    return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32, as the HF models do."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.weight = _param((dim,), dtype, jnp.ones)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * x32.astype(dtype)


class MLP(nnx.Module):
  """Gated feed-forward block: down(act(gate(x)) * up(x))."""

  def __init__(self, hidden: int, intermediate: int, act: str, *, dtype=jnp.float32):
    self.gate_proj = Linear(hidden, intermediate, dtype=dtype)
    self.up_proj = Linear(hidden, intermediate, dtype=dtype)
    self.down_proj = Linear(intermediate, hidden, dtype=dtype)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention-temperature multiplier `0.1 * mscale * ln(scale) + 1` (1 when scale <= 1)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, theta: float, s: dict) -> tuple[jax.Array, float]:
  """YaRN frequencies and attention factor (Peng et al. 2023), as transformers computes them.

  `s` is the rope dict after `config._rope`, so it holds `factor` and
  `original_max_position_embeddings`. Frequency i blends interpolation
  (`/factor`) and extrapolation with a ramp that is 0 below the correction
  dim of `beta_fast` rotations and 1 above that of `beta_slow`.
  """
  factor = s["factor"]
  orig = s["original_max_position_embeddings"]
  beta_fast = s.get("beta_fast") or 32
  beta_slow = s.get("beta_slow") or 1

  attention_factor = s.get("attention_factor")
  if attention_factor is None:
    if s.get("mscale") and s.get("mscale_all_dim"):
      attention_factor = yarn_get_mscale(factor, s["mscale"]) / yarn_get_mscale(factor, s["mscale_all_dim"])
    else:
      attention_factor = yarn_get_mscale(factor)

  def correction_dim(num_rot):
    return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if s.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  pos_freqs = theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp  # share of the original frequency
  inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
  return inv_freq, float(attention_factor)


def rope_frequencies(config: MoEConfig, seq_len: jax.Array | int = 0) -> tuple[jax.Array, float]:
  """Returns (inv_freq `[rope_dim // 2]`, attention scaling of cos/sin).

  `seq_len` (highest position + 1 of the step, may be traced) matters only
  for "dynamic" NTK scaling, which raises the base once a sequence outgrows
  `max_position_embeddings`, as transformers does per forward call.
  """
  dim, theta = config.rope_dim, config.rope_theta
  scaling = config.rope_scaling_dict
  rope_type = "default" if scaling is None else scaling["rope_type"]
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  if rope_type == "default":
    return 1.0 / theta**exponents, 1.0
  if rope_type == "linear":
    return 1.0 / theta**exponents / scaling["factor"], 1.0
  if rope_type == "dynamic":
    factor, max_pos = scaling["factor"], config.max_position_embeddings
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_pos)
    base = theta * (factor * length / max_pos - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base**exponents, 1.0
  return _yarn_inv_freq(dim, theta, scaling)  # "yarn"; MoEConfig rejects any other rope_type


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables `[B, T, rope_dim]` (frequencies repeated twice, HF layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, interleave: bool = False) -> jax.Array:
  """Rotates `x[B, T, N, rope_dim]` by position (rotate-half convention).

  With `interleave`, channels are first de-interleaved from (even, odd) pairs
  into two halves, which is how DeepSeek's MLA checkpoints store them.
  """
  dtype = x.dtype
  if interleave:
    b, t, n, d = x.shape
    x = x.reshape(b, t, n, d // 2, 2).swapaxes(-1, -2).reshape(b, t, n, d)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(dtype)


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------


class KVCache(NamedTuple):
  """Per-layer key/value cache.

  k: `[B, S, K, Dk]`, v: `[B, S, K, Dv]`, valid: `[B, S]` (False for padding
  and for slots not yet written).
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array


class AttentionInputs(NamedTuple):
  """What every attention layer needs besides the hidden states.

  positions: `[B, T]` rotary positions of the query tokens.
  token_valid: `[B, T]` False for left padding.
  index: scalar int32, cache row of the first query token.
  cos, sin: `[B, T, rope_dim]` rotary tables for `positions`.
  """

  positions: jax.Array
  token_valid: jax.Array
  index: jax.Array
  cos: jax.Array
  sin: jax.Array


def attention_inputs(config: MoEConfig, positions: jax.Array, token_valid: jax.Array, index) -> AttentionInputs:
  """The per-step `AttentionInputs` for positions/token_valid `[B, T]` written at cache row `index`."""
  inv_freq, scale = rope_frequencies(config, positions.max() + 1)
  cos, sin = rope_cos_sin(positions, inv_freq, scale)
  return AttentionInputs(positions, token_valid, jnp.asarray(index, jnp.int32), cos, sin)


def attention_mask(inputs: AttentionInputs, cache: KVCache, window: int | None) -> jax.Array:
  """Boolean mask `[B, 1, T, S]`: causal, padding-aware, optional sliding window."""
  t = inputs.positions.shape[1]
  s = cache.valid.shape[1]
  q_idx = inputs.index + jnp.arange(t)[:, None]
  k_idx = jnp.arange(s)[None, :]
  allowed = k_idx <= q_idx
  if window:
    allowed = allowed & (q_idx - k_idx < window)
  return (allowed[None] & cache.valid[:, None, :])[:, None]


def update_cache(cache: KVCache, k: jax.Array, v: jax.Array, valid: jax.Array, index) -> KVCache:
  """Writes `T` new rows at `index` (all sequences share the write position)."""
  k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), index, axis=1)
  v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), index, axis=1)
  valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, index, axis=1)
  return KVCache(k, v, valid)


def dot_product_attention(q, k, v, mask, scale: float) -> jax.Array:
  """Grouped-query attention with float32 softmax.

  q: `[B, T, H, Dk]`, k: `[B, S, K, Dk]`, v: `[B, S, K, Dv]`, mask `[B, 1, T, S]`.
  Returns `[B, T, H, Dv]`.
  """
  b, t, h, dk = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, h // kh, dk)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, v.shape[-1])


def merge_heads(out: jax.Array) -> jax.Array:
  """`[B, T, H, Dv]` -> `[B, T, H * Dv]`, as an array of its own shape (the heads concatenated).

  A reshape is free, but XLA:CPU then reads the output projection's row
  through the `[H, Dv]` indexing of the attention's result, element by
  element: the one-row product of decode ran ~4-10x slower (1.8 ms instead of
  0.2 ms for a 2048 x 2048 bfloat16 matrix here).
  """
  return jnp.concatenate([out[:, :, i] for i in range(out.shape[2])], axis=-1)


class Attention(nnx.Module):
  """Multi-head / grouped-query attention with rotary embeddings and optional q/k norms."""

  def __init__(self, config: MoEConfig, layer: int, *, dtype=jnp.float32):
    c = config
    d, h, kh, dh = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    self.q_proj = Linear(d, h * dh, bias=c.attention_bias, dtype=dtype)
    self.k_proj = Linear(d, kh * dh, bias=c.attention_bias, dtype=dtype)
    self.v_proj = Linear(d, kh * dh, bias=c.attention_bias, dtype=dtype)
    self.o_proj = Linear(h * dh, d, dtype=dtype)
    if c.qk_norm == "head":
      self.q_norm, self.k_norm = RMSNorm(dh, c.rms_norm_eps, dtype=dtype), RMSNorm(dh, c.rms_norm_eps, dtype=dtype)
    elif c.qk_norm == "full":
      self.q_norm = RMSNorm(h * dh, c.rms_norm_eps, dtype=dtype)
      self.k_norm = RMSNorm(kh * dh, c.rms_norm_eps, dtype=dtype)
    else:
      self.q_norm = self.k_norm = None
    self.qk_norm = c.qk_norm
    self.clip_qkv = c.clip_qkv
    self.num_heads, self.num_kv_heads, self.head_dim = h, kh, dh
    self.window = c.sliding_windows[layer]

  def kv_shape(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """((K, Dk), (K, Dv)) of this layer's cache rows."""
    return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

  def __call__(self, x: jax.Array, inputs: AttentionInputs, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """x: `[B, T, D]` -> (`[B, T, D]`, updated cache)."""
    b, t, _ = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.qk_norm == "full":
      q, k = self.q_norm(q), self.k_norm(k)
    if self.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, inputs.cos, inputs.sin)
    k = apply_rope(k, inputs.cos, inputs.sin)
    cache = update_cache(cache, k, v, inputs.token_valid, inputs.index)
    mask = attention_mask(inputs, cache, self.window)
    out = dot_product_attention(q, cache.k, cache.v, mask, self.head_dim**-0.5)
    return self.o_proj(merge_heads(out)), cache
