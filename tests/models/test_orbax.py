"""A converted model saved with orbax and restored computes the same logits."""

import numpy as np
import transformers

import moejax
from moejax.checkpoints import orbax_io
from tests.models.hf_utils import build_hf_model


def test_orbax_round_trip(tmp_path):
  config = transformers.Qwen2MoeConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    mlp_only_layers=[1],
  )
  build_hf_model(config, tmp_path / "hf", seed=3)
  model = moejax.load(tmp_path / "hf")
  orbax_io.save(model, tmp_path / "saved")
  restored = orbax_io.restore(tmp_path / "saved")
  assert restored.config == model.config
  ids = np.random.RandomState(0).randint(0, 61, (2, 9))
  np.testing.assert_array_equal(np.asarray(restored.forward(ids)), np.asarray(model.forward(ids)))
  host = orbax_io.restore(tmp_path / "saved", experts="host")
  assert host.experts[0].gate.sharding.memory_kind == "pinned_host" and host.experts[1] is None
