"""Multi-head latent attention (MLA) of DeepSeek-V2/V3.

Keys and values are projected through a low-rank latent: `kv_a_proj_with_mqa`
maps the hidden state to a latent of width r (normalised by `kv_a_layernorm`)
plus one rotary key of width dr shared by all heads; `kv_b_proj` expands the
latent to per-head `[k_nope | v]`. Queries come from `q_proj`, or with a
query LoRA from `q_b_proj(q_a_layernorm(q_a_proj(x)))`. Only the last dr
channels of each query/key head are rotated.

The cache holds the expanded per-head keys `[B, S, H, dn + dr]` and values
`[B, S, H, dv]`: simple and exact, at the price of the latent's memory
saving.

Shapes: B batch, T query tokens, S cache rows, D hidden, H heads, dn/dr the
non-rotary/rotary query-key widths, dv value width, r the kv latent rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.config import MoEConfig
from moejax.models.layers import (
  AttentionInputs,
  KVCache,
  Linear,
  RMSNorm,
  apply_rope,
  attention_mask,
  dot_product_attention,
  merge_heads,
  update_cache,
  yarn_get_mscale,
)

# transformers builds q_a_layernorm and kv_a_layernorm with the default eps, not rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def softmax_scale(config: MoEConfig) -> float:
  """`(dn + dr)**-0.5`, times `mscale(factor, mscale_all_dim)**2` under scaled rope (YaRN)."""
  scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
  scaling = config.rope_scaling_dict or {}
  if scaling.get("mscale_all_dim"):
    scale *= yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
  return scale


class MLAttention(nnx.Module):
  """DeepSeek multi-head latent attention; same interface as `layers.Attention`.

  `layer` is unused (every MLA layer is alike: no sliding window), kept for
  the interface that `decoder.make_attention` calls.
  """

  def __init__(self, config: MoEConfig, layer: int, *, dtype=jnp.float32):
    c = config
    d, h = c.hidden_size, c.num_heads
    self.nope, self.rope, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    qk = self.nope + self.rope
    if c.q_lora_rank is None:
      self.q_proj = Linear(d, h * qk, dtype=dtype)
    else:
      self.q_a_proj = Linear(d, c.q_lora_rank, bias=c.attention_bias, dtype=dtype)
      self.q_a_layernorm = RMSNorm(c.q_lora_rank, _LATENT_NORM_EPS, dtype=dtype)
      self.q_b_proj = Linear(c.q_lora_rank, h * qk, dtype=dtype)
    self.kv_a_proj_with_mqa = Linear(d, c.kv_lora_rank + self.rope, bias=c.attention_bias, dtype=dtype)
    self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, _LATENT_NORM_EPS, dtype=dtype)
    self.kv_b_proj = Linear(c.kv_lora_rank, h * (self.nope + self.v_dim), dtype=dtype)
    self.o_proj = Linear(h * self.v_dim, d, bias=c.attention_bias, dtype=dtype)
    self.q_lora = c.q_lora_rank is not None
    self.kv_lora_rank = c.kv_lora_rank
    self.num_heads = h
    self.interleave = c.rope_interleave
    self.scale = softmax_scale(c)

  def kv_shape(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """((H, dn + dr), (H, dv)) of this layer's cache rows."""
    return (self.num_heads, self.nope + self.rope), (self.num_heads, self.v_dim)

  def __call__(self, x: jax.Array, inputs: AttentionInputs, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """x: `[B, T, D]` -> (`[B, T, D]`, updated cache)."""
    b, t, _ = x.shape
    h = self.num_heads
    q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
    q = q.reshape(b, t, h, self.nope + self.rope)
    q_rot = apply_rope(q[..., self.nope :], inputs.cos, inputs.sin, interleave=self.interleave)

    ckv = self.kv_a_proj_with_mqa(x)  # [B, T, r + dr]
    latent = self.kv_a_layernorm(ckv[..., : self.kv_lora_rank])
    k_rot = apply_rope(ckv[..., None, self.kv_lora_rank :], inputs.cos, inputs.sin, interleave=self.interleave)
    kv = self.kv_b_proj(latent).reshape(b, t, h, self.nope + self.v_dim)

    q = jnp.concatenate([q[..., : self.nope], q_rot], axis=-1)
    k = jnp.concatenate([kv[..., : self.nope], jnp.broadcast_to(k_rot, (b, t, h, self.rope))], axis=-1)
    cache = update_cache(cache, k, kv[..., self.nope :], inputs.token_valid, inputs.index)
    mask = attention_mask(inputs, cache, window=None)
    out = dot_product_attention(q, cache.k, cache.v, mask, self.scale)
    return self.o_proj(merge_heads(out)), cache
