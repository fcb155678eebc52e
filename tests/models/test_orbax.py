"""A converted model saved with orbax and restored computes the same logits."""

import jax
import numpy as np
import orbax.checkpoint as ocp

import moejax
from moejax.checkpoints import orbax_io
from tests.models.hf_utils import build_hf_model, tiny_qwen2_moe_config


def test_orbax_round_trip(tmp_path):
  config = tiny_qwen2_moe_config(mlp_only_layers=[1])
  build_hf_model(config, tmp_path / "hf", seed=3)
  model = moejax.load(tmp_path / "hf")
  orbax_io.save(model, tmp_path / "saved")
  restored = orbax_io.restore(tmp_path / "saved")
  assert restored.config == model.config
  ids = np.random.RandomState(0).randint(0, 61, (2, 9))
  np.testing.assert_array_equal(np.asarray(restored.forward(ids)), np.asarray(model.forward(ids)))
  host = orbax_io.restore(tmp_path / "saved", experts="host")
  assert host.experts[0].gate.sharding.memory_kind == "pinned_host" and host.experts[1] is None


def test_orbax_round_trip_bfloat16_saves_the_weights(tmp_path):
  """bf16 experts (held as uint16 bits) are saved as bf16 weights and restored to the same held bits."""
  build_hf_model(tiny_qwen2_moe_config(), tmp_path / "hf", seed=4)
  model = moejax.load(tmp_path / "hf", dtype="bfloat16")
  orbax_io.save(model, tmp_path / "saved")
  with ocp.StandardCheckpointer() as ckpt:
    saved = ckpt.metadata(tmp_path / "saved" / "state").item_metadata.tree["experts"]
  assert {str(m.dtype) for m in jax.tree.leaves(saved)} == {"bfloat16"}
  for where in ("device", "host"):
    restored = orbax_io.restore(tmp_path / "saved", experts=where)
    for got, want in zip(restored.experts, model.experts):
      for a, b in zip(got, want):
        assert a.dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
