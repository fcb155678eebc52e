"""Trained parameters -> a HuggingFace checkpoint directory.

Writes `config.json` (a transformers config), `model.safetensors` in the hub
key layout that `save_pretrained` writes (routed experts one by one:
`model.layers.{i}.mlp.experts.{j}.gate_proj.weight`; every matrix `[out, in]`,
as moejax keeps it) and the tokenizer files. Key names come from
`moejax.checkpoints.hf`, the same table `moejax.load` reads with, so an
export loads back into the same parameters.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import transformers
from flax import nnx

from moejax.checkpoints.hf import hf_key, layout_for
from moejax.models.config import MoEConfig, from_hf_config

_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def qwen2_moe_config(
  *,
  vocab_size: int,
  hidden_size: int,
  num_layers: int,
  num_heads: int,
  num_kv_heads: int,
  moe_intermediate_size: int,
  num_experts: int,
  num_experts_per_tok: int,
  shared_expert_intermediate_size: int,
  norm_topk_prob: bool = False,
  max_position_embeddings: int = 2048,
  rope_theta: float = 10000.0,
  rms_norm_eps: float = 1e-6,
  eos_token_id: int = 0,
  dtype: str = "float32",
) -> dict[str, Any]:
  """A Qwen2-MoE `config.json` dictionary: every layer MoE with a sigmoid-gated shared expert."""
  config = transformers.Qwen2MoeConfig(
    architectures=["Qwen2MoeForCausalLM"],
    vocab_size=vocab_size,
    hidden_size=hidden_size,
    num_hidden_layers=num_layers,
    num_attention_heads=num_heads,
    num_key_value_heads=num_kv_heads,
    intermediate_size=shared_expert_intermediate_size,  # dense-MLP width; no layer is dense
    moe_intermediate_size=moe_intermediate_size,
    shared_expert_intermediate_size=shared_expert_intermediate_size,
    num_experts=num_experts,
    num_experts_per_tok=num_experts_per_tok,
    norm_topk_prob=norm_topk_prob,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=max_position_embeddings,
    rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    rms_norm_eps=rms_norm_eps,
    tie_word_embeddings=False,
    qkv_bias=True,
    use_sliding_window=False,
    bos_token_id=eos_token_id,
    eos_token_id=eos_token_id,
    pad_token_id=eos_token_id,
    dtype=dtype,
  )
  return config.to_dict()


def hf_tensors(config: MoEConfig, params: Mapping[str, Any], dtype: str = "float32") -> dict[str, np.ndarray]:
  """Parameters `{"decoder": nnx.State, "experts": [...]}` -> {hub tensor name: array} in `dtype`."""
  np_dtype = _NP_DTYPES[dtype]
  layout = layout_for(config)
  out = {}
  for path, var in nnx.to_flat_state(params["decoder"]):
    out[hf_key(path, layout, config.moe_layers[path[1]] if path[0] == "layers" else False)] = np.asarray(
      var[...], np.float32
    )
  g_name, u_name, d_name = layout.expert_proj
  for layer, w in enumerate(params["experts"]):
    if w is None:
      continue
    base = f"model.layers.{layer}.{layout.moe}.{layout.experts}"
    gate, up, down = (np.asarray(a, np.float32) for a in w)
    for j in range(config.num_experts):
      out[f"{base}.{j}.{g_name}.weight"] = gate[j]
      out[f"{base}.{j}.{u_name}.weight"] = up[j]
      out[f"{base}.{j}.{d_name}.weight"] = down[j]
  return {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in sorted(out.items())}


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes float32 / bfloat16 numpy arrays as one safetensors file (`format: pt` metadata, as transformers expects)."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, array in tensors.items():
    header[name] = {
      "dtype": _SAFETENSORS_DTYPES[array.dtype],
      "shape": list(array.shape),
      "data_offsets": [offset, offset + array.nbytes],
    }
    offset += array.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for array in tensors.values():
      f.write(array.tobytes())


def export_hf(
  path: str, config_dict: Mapping[str, Any], params: Mapping[str, Any], tokenizer, dtype: str = "float32"
) -> None:
  """Writes a HuggingFace checkpoint directory that `moejax.load` and transformers load as it is.

  Args:
    path: output directory (created).
    config_dict: the `config.json` dictionary (`qwen2_moe_config`); its
      `dtype` is set to `dtype`.
    params: trained parameters `{"decoder", "experts"}`.
    tokenizer: a transformers tokenizer, saved alongside.
    dtype: "float32" or "bfloat16" for the stored weights.
  """
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}; export supports {sorted(_NP_DTYPES)}.")
  os.makedirs(path, exist_ok=True)
  config_dict = {**config_dict, "dtype": dtype}
  transformers.AutoConfig.for_model(**config_dict).save_pretrained(path)
  save_safetensors(hf_tensors(from_hf_config(config_dict), params, dtype), os.path.join(path, "model.safetensors"))
  tokenizer.save_pretrained(path)
