"""Saving a converted model with orbax and restoring it.

A saved model is a directory holding `moejax_config.json` (the `MoEConfig`)
and an orbax checkpoint of `{"decoder": <nnx state>, "experts": {layer:
ExpertWeights}}`. Restoring needs no HuggingFace files.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from moejax.models.config import MoEConfig
from moejax.models.decoder import Decoder
from moejax.models.model import Model
from moejax.models.moe import ExpertWeights, values

_CONFIG = "moejax_config.json"
_STATE = "state"


def _config_from_json(d: dict) -> MoEConfig:
  tuples = {f.name for f in dataclasses.fields(MoEConfig) if str(f.type).startswith("tuple")}
  d = {k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()}
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in d["rope_scaling"])
  return MoEConfig(**d)


def save(model: Model, path: str | os.PathLike) -> None:
  """Writes `model` (config, decoder parameters, routed experts) to the directory `path`."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, _CONFIG), "w") as f:
    json.dump(dataclasses.asdict(model.config), f, indent=2)
  experts = {
    str(l): values(ExpertWeights(*(jnp.asarray(a) for a in w))) for l, w in enumerate(model.experts) if w is not None
  }
  tree = {"decoder": nnx.to_pure_dict(model.state), "experts": experts}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, _STATE), tree, force=True)


def restore(path: str | os.PathLike, experts: str = "device") -> Model:
  """Restores a model saved by `save`; `experts="host"` puts routed experts in `pinned_host` memory."""
  path = os.path.abspath(os.fspath(path))
  config_file = os.path.join(path, _CONFIG)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{path!r} is not a moejax orbax checkpoint (no {_CONFIG}); write one with save().")
  with open(config_file) as f:
    config = _config_from_json(json.load(f))
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(os.path.join(path, _STATE))
    dtype = jax.tree.leaves(meta.item_metadata.tree["decoder"])[0].dtype
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    target = {
      "decoder": jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state)),
      "experts": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta.item_metadata.tree["experts"]),
    }
    tree = ckpt.restore(os.path.join(path, _STATE), target)
  nnx.replace_by_pure_dict(state, tree["decoder"])
  decoder = nnx.merge(graphdef, state)
  routed: list[ExpertWeights | None] = [None] * config.num_layers
  pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
  for layer, w in tree["experts"].items():
    w = ExpertWeights(**w) if isinstance(w, dict) else ExpertWeights(*w)  # `Model` holds bf16 as bits
    routed[int(layer)] = jax.device_put(w, pinned) if experts == "host" else w
  return Model(config, decoder, routed)
