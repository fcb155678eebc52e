"""`moejax.load`: user errors with clear messages, and the checkpoint layouts it accepts.

Uses one tiny Qwen2-MoE checkpoint written by `save_pretrained` (per-expert
hub layout) and rewrites copies of it by hand.
"""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import moejax
from moejax.checkpoints.safetensors_io import CheckpointError
from moejax.models.config import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from moejax.models.moe import values
from tests.models.hf_utils import build_hf_model
from tests.models.test_parity import CASES, NEW, PROMPT, _ids

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(path of a qwen2_moe hub-layout checkpoint, its float32 logits on `_ids(PROMPT + NEW)`)."""
  path = tmp_path_factory.mktemp("qwen2_moe")
  build_hf_model(CASES["qwen2_moe"](), path)
  return path, np.asarray(moejax.load(path).forward(_ids(PROMPT + NEW, 97)))


def _rewrite(src, dst, transform) -> None:
  """Copies the checkpoint `src` to `dst`, passing its tensors `{name: array}` through `transform`."""
  os.makedirs(dst, exist_ok=True)
  shutil.copy(src / "config.json", dst / "config.json")
  save_file(transform(load_file(src / WEIGHTS)), dst / WEIGHTS, metadata={"format": "pt"})


def _logits(path, **kwargs) -> np.ndarray:
  return np.asarray(moejax.load(path, **kwargs).forward(_ids(PROMPT + NEW, 97)))


# ----------------------------------------------------------------------------
# Errors a user can cause
# ----------------------------------------------------------------------------


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    moejax.load(tmp_path / "no_such_checkpoint")


def test_directory_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="No config.json"):
    moejax.load(tmp_path)


def test_directory_without_weights(checkpoint, tmp_path):
  shutil.copy(checkpoint[0] / "config.json", tmp_path)
  with pytest.raises(CheckpointError, match=r"No \*\.safetensors weights"):
    moejax.load(tmp_path)


def test_unsupported_model_type_lists_supported(checkpoint, tmp_path):
  shutil.copytree(checkpoint[0], tmp_path, dirs_exist_ok=True)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
  with pytest.raises(UnsupportedModelError, match="'llama'") as err:
    moejax.load(tmp_path)
  assert all(name in str(err.value) for name in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize(
  "key",
  ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.experts.5.up_proj.weight"],
  ids=["attention", "expert"],
)
def test_missing_tensor_is_named(checkpoint, tmp_path, key):
  _rewrite(checkpoint[0], tmp_path, lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(CheckpointError, match=f"'{key}' is missing"):
    moejax.load(tmp_path)


def test_misshaped_tensor_is_named(checkpoint, tmp_path):
  key = "model.layers.2.post_attention_layernorm.weight"
  _rewrite(checkpoint[0], tmp_path, lambda t: {**t, key: t[key][:-1]})
  with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(63,\), but the config implies \(64,\)"):
    moejax.load(tmp_path)


@pytest.mark.parametrize(
  "damage, message",
  [
    (lambda data: data[: len(data) // 2], "is truncated"),
    (lambda data: data[:5], "no safetensors header"),
    (lambda data: (999).to_bytes(8, "little") + b"{not json" + data[17:], "corrupt safetensors header"),
    (lambda data: (10**12).to_bytes(8, "little") + data[8:], "corrupt safetensors header"),
  ],
  ids=["truncated_data", "truncated_header", "garbage_header", "header_length"],
)
def test_corrupt_safetensors(checkpoint, tmp_path, damage, message):
  shutil.copytree(checkpoint[0], tmp_path, dirs_exist_ok=True)
  weights = tmp_path / WEIGHTS
  weights.write_bytes(damage(weights.read_bytes()))
  with pytest.raises(CheckpointError, match=message):
    moejax.load(tmp_path)


def test_bad_arguments(checkpoint):
  with pytest.raises(ValueError, match="experts='gpu'"):
    moejax.load(checkpoint[0], experts="gpu")
  with pytest.raises(ValueError, match="Unsupported dtype 'int8'"):
    moejax.load(checkpoint[0], dtype="int8")


# ----------------------------------------------------------------------------
# Layouts and placements that must give the same model
# ----------------------------------------------------------------------------


def _fuse_experts(tensors: dict) -> dict:
  """Per-expert hub keys -> the transformers-5 fused layout, gate_up_proj `[E, 2F, D]`, down_proj `[E, D, F]`."""
  out, experts = {}, {}
  for key, value in tensors.items():
    prefix, sep, rest = key.partition(".mlp.experts.")
    if not sep:
      out[key] = value
      continue
    index, proj, _ = rest.split(".")
    experts.setdefault(prefix, {}).setdefault(proj, {})[int(index)] = value
  for prefix, projs in experts.items():
    order = sorted(projs["gate_proj"])
    out[f"{prefix}.mlp.experts.gate_up_proj"] = np.stack(
      [np.concatenate([projs["gate_proj"][j], projs["up_proj"][j]]) for j in order]
    )
    out[f"{prefix}.mlp.experts.down_proj"] = np.stack([projs["down_proj"][j] for j in order])
  return out


def test_fused_expert_layout_loads_identically(checkpoint, tmp_path):
  _rewrite(checkpoint[0], tmp_path, _fuse_experts)
  keys = load_file(tmp_path / WEIGHTS).keys()
  assert "model.layers.0.mlp.experts.gate_up_proj" in keys
  assert not any(".mlp.experts.0." in k for k in keys)
  np.testing.assert_array_equal(_logits(tmp_path), checkpoint[1])


def test_sharded_checkpoint_loads_identically(checkpoint, tmp_path):
  shutil.copy(checkpoint[0] / "config.json", tmp_path)
  tensors = load_file(checkpoint[0] / WEIGHTS)
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, tmp_path / file, metadata={"format": "pt"})
    weight_map.update({k: file for k in part})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  np.testing.assert_array_equal(_logits(tmp_path), checkpoint[1])


def test_bfloat16_is_close_to_float32(checkpoint):
  model = moejax.load(checkpoint[0], dtype="bfloat16")
  assert model.dtype == np.dtype("bfloat16")
  # bf16 experts are held as their uint16 bits, which are the rounded float32 weights
  assert model.experts[0].gate.dtype == np.uint16
  f32 = moejax.load(checkpoint[0], dtype="float32")
  np.testing.assert_array_equal(
    np.asarray(values(model.experts[0]).down), np.asarray(f32.experts[0].down).astype(ml_dtypes.bfloat16)
  )
  logits = np.asarray(model.forward(_ids(PROMPT + NEW, 97)))
  ref = checkpoint[1]
  assert logits.dtype == np.float32
  # bf16 keeps 8 mantissa bits, and this random model is sensitive: a few tokens flip an expert
  # (max drift ~7% of the logit range, mean ~0.6%, measured).
  scale = np.abs(ref).max()
  assert np.abs(logits - ref).mean() <= 0.02 * scale
  assert np.abs(logits - ref).max() <= 0.2 * scale
  assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_host_experts_are_pinned_host_arrays_with_same_logits(checkpoint):
  model = moejax.load(checkpoint[0], experts="host")
  for layer, w in enumerate(model.experts):
    assert (w is None) == (not model.config.moe_layers[layer])
    if w is not None:
      assert all(a.sharding.memory_kind == "pinned_host" for a in w)
  np.testing.assert_array_equal(np.asarray(model.forward(_ids(PROMPT + NEW, 97))), checkpoint[1])
