"""Similarity matrices `[L, E, E]` of a loaded model, one per MoE layer (SPEC section 3).

Builds every source of `moejax.scheduling.similarity` from a `Model`:
"router" (router weight cosine), "weight" (expert weight cosine), "output"
(expert outputs on calibration tokens, from the hidden states entering each
layer's experts) and "coactivation" (from the experts the engine computed
per token, recorded with `Engine(record_routing=True)`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from moejax.engine import Engine
from moejax.models import decoder as decoder_lib
from moejax.models.model import Model, prompt_positions
from moejax.models.moe import ExpertWeights, values
from moejax.scheduling import similarity


def _layer_experts(model: Model, layer: int) -> ExpertWeights:
  """One layer's routed experts in device memory (host-resident ones are copied there)."""
  return ExpertWeights(*(jax.device_put(a, jax.memory.Space.Device) for a in model.experts[layer]))


def expert_inputs(model: Model, input_ids, attention_mask=None) -> dict[int, np.ndarray]:
  """Tokens entering each MoE layer's experts on a resident forward of a batch.

  Moves one layer's experts to the device at a time.

  Args:
    input_ids: `[B, T]` calibration tokens (left padded where the mask is 0).

  Returns:
    {MoE layer: `[N_valid, D]` float32 post-attention-norm hidden states}.
  """
  dec = model.decoder
  ids = jnp.asarray(input_ids, jnp.int32)
  valid = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  inputs = dec.attention_inputs(prompt_positions(valid), valid, 0)
  caches = model.init_caches(*ids.shape)
  h = dec.embed(ids)
  keep = np.asarray(valid).reshape(-1)
  out = {}
  for l, (layer, cache) in enumerate(zip(dec.layers, caches)):
    h, _ = layer.attend(h, inputs, cache)
    if layer.is_moe:
      out[l] = np.asarray(layer.ffn_input(h), np.float32)[keep]
      h = decoder_lib.moe_layer_resident(model.config, layer, h, _layer_experts(model, l))
    else:
      h = layer.dense_ffn(h)
  return out


def routed_experts(model: Model, input_ids, new_tokens: int) -> dict[int, np.ndarray]:
  """Experts selected per token and MoE layer over a prefill and `new_tokens` greedy decode steps.

  Runs the exact "layerwise" policy with `record_routing` (every expert streamed in per layer).

  Returns:
    {MoE layer: `[N, k]` int32}.
  """
  engine = Engine(model, policy="layerwise", record_routing=True)
  result = engine.generate(np.asarray(input_ids, np.int32), new_tokens)
  return {
    l: np.concatenate([step[l].experts for step in result.routing if l in step]) for l in model.config.moe_layer_ids
  }


def build_similarity(
  model: Model,
  source: str,
  *,
  calibration_ids=None,
  new_tokens: int = 0,
  routing: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
  """`[L, E, E]` similarity of the named source, L = number of MoE layers (in layer order).

  Args:
    model: the loaded model (routed experts on host or device).
    source: one of `similarity.SIMILARITY_SOURCES`.
    calibration_ids: `[B, T]` tokens, needed by "output" and by
      "coactivation" without `routing`.
    new_tokens: greedy decode steps after the prefill, for "coactivation".
    routing: a recorded {layer: `[N, k]`} trace for "coactivation".
  """
  config = model.config
  layers = config.moe_layer_ids
  if source == "router":
    mats = [similarity.build("router", model.decoder.layers[l].mlp.router.weight[...]) for l in layers]
  elif source == "weight":
    mats = [similarity.build("weight", *values(_layer_experts(model, l))) for l in layers]
  elif source == "output":
    if calibration_ids is None:
      raise ValueError("source 'output' needs calibration_ids [B, T].")
    xs = expert_inputs(model, calibration_ids)
    mats = [similarity.build("output", xs[l], *values(_layer_experts(model, l)), act=config.hidden_act) for l in layers]
  elif source == "coactivation":
    if routing is None:
      if calibration_ids is None:
        raise ValueError("source 'coactivation' needs calibration_ids [B, T] or a recorded routing trace.")
      routing = routed_experts(model, calibration_ids, new_tokens)
    mats = [similarity.build("coactivation", jnp.asarray(routing[l]), config.num_experts) for l in layers]
  else:
    raise ValueError(f"unknown similarity source {source!r}; choose one of {similarity.SIMILARITY_SOURCES}.")
  return np.stack([np.asarray(m, np.float32) for m in mats])
