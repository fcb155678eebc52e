"""`moejax.load`: a HuggingFace checkpoint directory -> `Model`."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.checkpoints.hf import hf_key, layout_for, read_experts, read_param
from moejax.checkpoints.safetensors_io import CheckpointReader
from moejax.models.config import MoEConfig, from_hf_config, load_hf_config_dict
from moejax.models.decoder import Decoder
from moejax.models.model import Model
from moejax.models.moe import ExpertWeights

EXPERT_PLACEMENTS = ("device", "host")


def resolve_dtype(dtype) -> jnp.dtype:
  names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}
  if isinstance(dtype, str):
    if dtype not in names:
      raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(names)}.")
    return jnp.dtype(names[dtype])
  return jnp.dtype(dtype)


def build_decoder(config: MoEConfig, reader: CheckpointReader, dtype) -> Decoder:
  """Instantiates the decoder abstractly and fills it from the checkpoint."""
  abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype))
  graphdef, state = nnx.split(abstract)
  layout = layout_for(config)
  filled = []
  for path, var in nnx.to_flat_state(state):
    key, transpose = hf_key(path, layout, config.moe_layers[path[1]] if path[0] == "layers" else False)
    array = read_param(reader, key, transpose, var.shape)
    filled.append((path, var.replace(jnp.asarray(array, var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def load(path: str | os.PathLike, dtype="float32", experts: str = "device") -> Model:
  """Loads a HuggingFace MoE checkpoint directory.

  Args:
    path: directory with `config.json` and `*.safetensors` (single file or
      sharded with `model.safetensors.index.json`).
    dtype: parameter dtype, "float32" or "bfloat16".
    experts: where routed experts go: "device" (resident jax arrays) or
      "host" (memory-mapped numpy arrays stacked `[E, ...]`, for offloading).

  Returns:
    A `Model`.
  """
  if experts not in EXPERT_PLACEMENTS:
    raise ValueError(f"experts={experts!r}; use one of {EXPERT_PLACEMENTS}.")
  dtype = resolve_dtype(dtype)
  config = from_hf_config(load_hf_config_dict(path))
  reader = CheckpointReader(path)
  decoder = build_decoder(config, reader, dtype)
  np_dtype = np.dtype(dtype)
  routed = []
  for layer in range(config.num_layers):
    if not config.moe_layers[layer]:
      routed.append(None)
      continue
    w = ExpertWeights(*read_experts(reader, config, layer, np_dtype))
    routed.append(w if experts == "host" else ExpertWeights(*(jnp.asarray(a) for a in w)))
  return Model(config, decoder, routed)
