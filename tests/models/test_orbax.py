"""A converted model saved with orbax and restored computes the same logits."""

import numpy as np

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
