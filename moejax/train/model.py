"""Training-time model: random initialisation, a differentiable forward, the loss.

The forward is `moejax.models.decoder.forward` without a KV cache to keep,
with routed experts computed by `grouped_experts` (the same function, a
faster gradient on CPU). It reuses the model's own modules and routing
(`Router`, `select_experts`, `combine_weights`, shared experts, norms), so
trained weights give the same logits through `moejax.load`.

Parameters are a pytree `{"decoder": nnx.State, "experts": [ExpertWeights | None per layer]}`,
the split that `moejax.Model` uses at inference.

Shapes: B batch, T tokens, V vocab, N = B * T, E experts, k experts per token.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models import moe
from moejax.models.config import MoEConfig
from moejax.models.decoder import Decoder
from moejax.train.grouped import grouped_experts

Params = dict[str, Any]


class Routing(NamedTuple):
  """One MoE layer's routing: scores `[N, E]` float32 and chosen experts `[N, k]` int32."""

  scores: jax.Array
  experts: jax.Array


def init_params(config: MoEConfig, key: jax.Array, std: float = 0.02) -> tuple[nnx.GraphDef, Params]:
  """Random parameters: matrices and embeddings ~ N(0, std^2), norm weights 1, biases 0.

  Returns:
    (decoder graphdef, params); `nnx.merge(graphdef, params["decoder"])` is the decoder.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config)))
  flat = nnx.to_flat_state(state)
  keys = iter(jax.random.split(key, len(flat) + 3 * config.num_layers))
  filled = []
  for path, var in flat:
    if path[-1] == "bias":
      value = jnp.zeros(var.shape, var.dtype)
    elif var.ndim == 1:  # norm weights
      value = jnp.ones(var.shape, var.dtype)
    else:
      value = std * jax.random.normal(next(keys), var.shape, var.dtype)
    filled.append((path, var.replace(value)))
  d, f, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
  experts = []
  for layer in range(config.num_layers):
    if not config.moe_layers[layer]:
      experts.append(None)
      continue
    experts.append(
      moe.ExpertWeights(
        std * jax.random.normal(next(keys), (e, f, d)),
        std * jax.random.normal(next(keys), (e, f, d)),
        std * jax.random.normal(next(keys), (e, d, f)),
      )
    )
  return graphdef, {"decoder": nnx.from_flat_state(filled), "experts": experts}


def forward(
  decoder: Decoder, experts: list[moe.ExpertWeights | None], ids: jax.Array, block: int = 64
) -> tuple[jax.Array, list[Routing]]:
  """Causal forward of unpadded sequences ids `[B, T]` (positions 0..T-1).

  Returns:
    (logits `[B, T, V]` float32, `Routing` of each MoE layer in layer order).
  """
  config = decoder.config
  b, t = ids.shape
  h = decoder.embed(ids)
  inputs = decoder.attention_inputs(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), bool), 0)
  routing = []
  for layer, w, cache in zip(decoder.layers, experts, decoder.init_caches(b, t)):
    h, _ = layer.attend(h, inputs, cache)
    if not layer.is_moe:
      h = layer.dense_ffn(h)
      continue
    x = layer.ffn_input(h)
    scores = layer.router_scores(x)
    idx, mix = moe.own_routing(config, scores, layer.mlp.router.selection_bias())
    h = layer.finish_moe(h, x, grouped_experts(x, w, idx, mix, config.hidden_act, block))
    routing.append(Routing(scores, idx))
  return decoder.logits(h), routing


def load_balancing_loss(routing: Routing, num_experts: int) -> jax.Array:
  """Switch-style auxiliary loss `E / k * sum_e f_e * P_e`; 1 for perfectly uniform routing.

  f_e: fraction of tokens that chose expert e; P_e: mean score of e. Its
  gradient (through P_e) pushes scores down for over-used experts.
  """
  n, k = routing.experts.shape
  frac = jnp.zeros((num_experts,), jnp.float32).at[routing.experts.reshape(-1)].add(1.0) / n
  return num_experts / k * jnp.sum(frac * routing.scores.mean(0))


def loss_fn(
  graphdef: nnx.GraphDef, params: Params, batch: jax.Array, *, aux_coef: float, block: int = 64
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy plus `aux_coef` times the mean load-balancing loss.

  Args:
    batch: `[B, T + 1]` token windows; tokens 0..T-1 predict 1..T.

  Returns:
    (loss, {"loss", "ce", "balance"}) scalars.
  """
  decoder = nnx.merge(graphdef, params["decoder"])
  logits, routing = forward(decoder, params["experts"], batch[:, :-1], block)
  targets = batch[:, 1:]
  ce = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])
  e = decoder.config.num_experts
  balance = jnp.mean(jnp.stack([load_balancing_loss(r, e) for r in routing])) if routing else jnp.float32(0)
  loss = ce + aux_coef * balance
  return loss, {"loss": loss, "ce": ce, "balance": balance}
