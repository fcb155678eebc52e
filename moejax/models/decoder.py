"""Decoder layer and decoder stack, with the forward pass split per layer.

A layer runs as `attend` (norm + attention + residual) followed by either
`dense_ffn` or the MoE stages (`ffn_input` -> router scores -> routed experts
from given weights -> `finish_moe`). The fully resident forward composes these
in one jitted function (`forward`); the offload engine calls the same stages
one layer at a time and decides in between where each routed expert comes
from.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models import moe
from moejax.models.config import MoEConfig
from moejax.models.layers import (
  MLP,
  Attention,
  AttentionInputs,
  KVCache,
  Linear,
  RMSNorm,
  attention_inputs,
  linear,
)


def make_attention(config: MoEConfig, layer: int, dtype) -> nnx.Module:
  """The attention module of a layer (GQA or multi-head latent attention)."""
  if config.attention_type == "mla":
    from moejax.models.mla import MLAttention  # DeepSeek-V2/V3 only

    return MLAttention(config, layer, dtype=dtype)
  return Attention(config, layer, dtype=dtype)


class DecoderLayer(nnx.Module):
  """Pre-norm decoder layer: attention, then a dense MLP or an MoE block."""

  def __init__(self, config: MoEConfig, layer: int, *, dtype=jnp.float32):
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.attn = make_attention(config, layer, dtype)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.is_moe = config.moe_layers[layer]
    if self.is_moe:
      self.mlp = moe.MoEBlock(config, dtype=dtype)
    else:
      self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, dtype=dtype)

  def attend(self, h: jax.Array, inputs: AttentionInputs, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """h: `[B, T, D]` -> (h + attention(norm(h)), updated cache)."""
    out, cache = self.attn(self.input_layernorm(h), inputs, cache)
    return h + out, cache

  def dense_ffn(self, h: jax.Array) -> jax.Array:
    """Dense layers: h + MLP(norm(h)), h `[B, T, D]`."""
    return h + self.mlp(self.post_attention_layernorm(h))

  def ffn_input(self, h: jax.Array) -> jax.Array:
    """MoE layers: the normalised tokens `[N, D]` (N = B * T) fed to router and experts."""
    return self.post_attention_layernorm(h).reshape(-1, h.shape[-1])

  def router_scores(self, x: jax.Array) -> jax.Array:
    """x `[N, D]` -> scores `[N, E]` float32."""
    return self.mlp.router(x)

  def finish_moe(self, h: jax.Array, x: jax.Array, routed: jax.Array) -> jax.Array:
    """h `[B, T, D]` residual + routed output `[N, D]` + shared experts of x `[N, D]`."""
    y = routed + self.mlp.shared_output(x)
    return h + y.reshape(h.shape).astype(h.dtype)


def lm_logits(norm: RMSNorm, lm_head: Linear | None, embed_table: jax.Array, h: jax.Array) -> jax.Array:
  """Final norm and LM head: h `[B, T, D]` -> logits `[B, T, V]` float32 (tied to the embedding without a head)."""
  h = norm(h)
  out = linear(h, embed_table) if lm_head is None else lm_head(h)
  return out.astype(jnp.float32)


class Decoder(nnx.Module):
  """Embedding, decoder layers, final norm and LM head (routed experts excluded)."""

  def __init__(self, config: MoEConfig, *, dtype=jnp.float32):
    self.config = config
    self.embed_tokens = nnx.Param(jnp.zeros((config.vocab_size, config.hidden_size), dtype))
    self.layers = nnx.List([DecoderLayer(config, i, dtype=dtype) for i in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, dtype=dtype)

  def embed(self, ids: jax.Array) -> jax.Array:
    """ids `[B, T]` -> `[B, T, D]`."""
    return jnp.take(self.embed_tokens[...], ids, axis=0)

  def attention_inputs(self, positions: jax.Array, token_valid: jax.Array, index) -> AttentionInputs:
    """Shared per-step attention inputs; positions/token_valid `[B, T]`."""
    return attention_inputs(self.config, positions, token_valid, index)

  def logits(self, h: jax.Array) -> jax.Array:
    """h `[B, T, D]` -> logits `[B, T, V]` float32."""
    return lm_logits(self.norm, self.lm_head, self.embed_tokens[...], h)

  def init_caches(self, batch: int, max_len: int, dtype=None) -> list[KVCache]:
    """Empty KV caches, one per layer, `max_len` rows each."""
    dtype = dtype or self.embed_tokens[...].dtype
    caches = []
    for layer in self.layers:
      (kh, dk), (vh, dv) = layer.attn.kv_shape()
      caches.append(
        KVCache(
          jnp.zeros((batch, max_len, kh, dk), dtype),
          jnp.zeros((batch, max_len, vh, dv), dtype),
          jnp.zeros((batch, max_len), bool),
        )
      )
    return caches


def moe_layer_resident(config: MoEConfig, layer: DecoderLayer, h: jax.Array, experts: moe.ExpertWeights) -> jax.Array:
  """MoE half of a layer with every routed expert available: h `[B, T, D]`."""
  x = layer.ffn_input(h)
  scores = layer.router_scores(x)
  idx, mix = moe.own_routing(config, scores, layer.mlp.router.selection_bias())
  routed = moe.routed_experts(x, experts, idx, mix, config.hidden_act)
  return layer.finish_moe(h, x, routed)


def forward(
  decoder: Decoder,
  experts: Sequence[moe.ExpertWeights | None],
  ids: jax.Array,
  positions: jax.Array,
  token_valid: jax.Array,
  index,
  caches: Sequence[KVCache],
) -> tuple[jax.Array, list[KVCache]]:
  """Fully resident forward of T tokens per sequence, writing caches at `index`.

  Args:
    decoder: the model without routed experts.
    experts: per layer, routed expert weights `[E, ...]` (None for dense layers).
    ids, positions, token_valid: `[B, T]`.
    index: cache row of the first token.
    caches: per layer KV caches.

  Returns:
    (logits `[B, T, V]` float32, updated caches).
  """
  config = decoder.config
  h = decoder.embed(ids)
  inputs = decoder.attention_inputs(positions, token_valid, index)
  new_caches = []
  for layer, w, cache in zip(decoder.layers, experts, caches):
    h, cache = layer.attend(h, inputs, cache)
    h = moe_layer_resident(config, layer, h, w) if layer.is_moe else layer.dense_ffn(h)
    new_caches.append(cache)
  return decoder.logits(h), new_caches
