"""`moejax.load`: a HuggingFace checkpoint directory -> `Model`.

Routed experts dominate a MoE checkpoint, so they are read one expert at a
time and written straight into their final stacked arrays (device memory, or
`pinned_host` memory for the offload engine): each expert's bytes are read
from the file once and copied once, and besides the model itself the load
holds one expert in flight. Peak memory is the model in the requested dtype
plus about one expert (tested in `tests/models/test_load_memory.py`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.compute_on import compute_on
from tqdm.auto import tqdm

from moejax.checkpoints.hf import expert_tensors, hf_key, layout_for
from moejax.checkpoints.safetensors_io import CheckpointReader
from moejax.models.config import MoEConfig, from_hf_config, load_hf_config_dict
from moejax.models.decoder import Decoder
from moejax.models.model import Model
from moejax.models.moe import ExpertWeights, stored_dtype

EXPERT_PLACEMENTS = ("device", "host")
_DTYPE_NAMES = {
  "float32": jnp.float32,
  "fp32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
  "float16": jnp.float16,
  "fp16": jnp.float16,
}


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in _DTYPE_NAMES:
      raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}, or None for the checkpoint's.")
    return jnp.dtype(_DTYPE_NAMES[dtype])
  return jnp.dtype(dtype)


def checkpoint_dtype(reader: CheckpointReader) -> jnp.dtype:
  """The dtype the checkpoint stores its weights in (that of the token embedding)."""
  dtype = reader.dtype("model.embed_tokens.weight")
  return jnp.dtype(dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(jnp.float32)


def build_decoder(config: MoEConfig, reader: CheckpointReader, dtype) -> Decoder:
  """Instantiates the decoder abstractly and fills it from the checkpoint, one tensor at a time."""
  abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype))
  graphdef, state = nnx.split(abstract)
  layout = layout_for(config)
  filled = []
  for path, var in nnx.to_flat_state(state):
    key = hf_key(path, layout, config.moe_layers[path[1]] if path[0] == "layers" else False)
    filled.append((path, var.replace(jnp.asarray(reader.get(key, var.shape), var.dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


@functools.partial(jax.jit, donate_argnums=0)
def _write_row(stack: jax.Array, row: jax.Array, value: jax.Array) -> jax.Array:
  """stack `[E, ...]` with `stack[row] = value`, in place (the stack is donated)."""
  return jax.lax.dynamic_update_index_in_dim(stack, value, row, 0)


_write_host_row = compute_on("device_host")(_write_row)


def _experts_of_layer(reader: CheckpointReader, config: MoEConfig, layer: int, dtype, placement: str) -> ExpertWeights:
  """The layer's routed experts `[E, ...]` in `dtype` (as stacks hold it: `moe.stored_dtype`), written expert by
  expert into arrays in their final memory."""
  e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
  device = jax.devices()[0]
  if placement == "host":
    sharding, write = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"), _write_host_row
  else:
    sharding, write = jax.sharding.SingleDeviceSharding(device), _write_row
  # np.zeros maps zero pages lazily: only the final arrays' own pages are ever written.
  held = stored_dtype(dtype)
  stacks = [jax.device_put(np.zeros(shape, held), sharding) for shape in ((e, f, d), (e, f, d), (e, d, f))]
  for j in range(e):
    row = jnp.int32(j)
    tensors = (t.astype(dtype, copy=False).view(held) for t in expert_tensors(reader, config, layer, j))
    stacks = [write(s, row, jax.device_put(t, sharding)) for s, t in zip(stacks, tensors)]
    jax.block_until_ready(stacks)  # one expert in flight: its buffers are freed before the next is read
  return ExpertWeights(*stacks)


def load(path: str | os.PathLike, dtype=None, experts: str = "device", progress: bool = True) -> Model:
  """Loads a HuggingFace MoE checkpoint directory.

  Args:
    path: directory with `config.json` and `*.safetensors` (single file or
      sharded with `model.safetensors.index.json`).
    dtype: parameter dtype, "float32" or "bfloat16"; None (default) keeps the
      checkpoint's own (a bfloat16 checkpoint loads as bfloat16).
    experts: where routed experts go: "device" (resident) or "host"
      (`pinned_host` arrays stacked `[E, ...]`, the offload engine's host store).
    progress: show a progress bar over the layers.

  Returns:
    A `Model`.
  """
  if experts not in EXPERT_PLACEMENTS:
    raise ValueError(f"experts={experts!r}; use one of {EXPERT_PLACEMENTS}.")
  config = from_hf_config(load_hf_config_dict(path))
  reader = CheckpointReader(path)
  dtype = checkpoint_dtype(reader) if dtype is None else resolve_dtype(dtype)
  decoder = build_decoder(config, reader, dtype)
  routed = [None] * config.num_layers
  for layer in tqdm(
    config.moe_layer_ids, desc=f"loading {os.path.basename(os.path.normpath(path))}", unit="layer", disable=not progress
  ):
    routed[layer] = _experts_of_layer(reader, config, layer, np.dtype(dtype), experts)
  return Model(config, decoder, routed)
