"""config.json -> MoEConfig for the DeepSeek and XVERSE families, at the real models' sizes.

Values from the released config.json files (see notes/model_families.md);
nothing is built, so these are cheap.
"""

import dataclasses

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moejax.checkpoints.hf import hf_key, layout_for
from moejax.models.config import UnsupportedModelError, from_hf_config
from moejax.models.layers import rope_frequencies
from moejax.models.mla import softmax_scale
from tests.models.reference_models import moe_layer_indices, tiny_deepseek_config, tiny_xverse_config

DEEPSEEK_V2_LITE = dict(
  model_type="deepseek_v2",
  vocab_size=102400,
  hidden_size=2048,
  intermediate_size=10944,
  moe_intermediate_size=1408,
  num_hidden_layers=27,
  num_attention_heads=16,
  num_key_value_heads=16,
  n_routed_experts=64,
  n_shared_experts=2,
  num_experts_per_tok=6,
  first_k_dense_replace=1,
  moe_layer_freq=1,
  kv_lora_rank=512,
  q_lora_rank=None,
  qk_nope_head_dim=128,
  qk_rope_head_dim=64,
  v_head_dim=128,
  topk_method="greedy",
  n_group=1,
  topk_group=1,
  norm_topk_prob=False,
  routed_scaling_factor=1.0,
  scoring_func="softmax",
  max_position_embeddings=163840,
  rms_norm_eps=1e-6,
  rope_theta=10000,
  rope_scaling={
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
  },
)

DEEPSEEK_MOE_16B = tiny_deepseek_config(
  vocab_size=102400,
  hidden_size=2048,
  intermediate_size=10944,
  moe_intermediate_size=1408,
  num_hidden_layers=28,
  num_attention_heads=16,
  num_key_value_heads=16,
  n_routed_experts=64,
  n_shared_experts=2,
  num_experts_per_tok=6,
)

XVERSE_MOE_A4_2B = {
  k: v
  for k, v in tiny_xverse_config(
    vocab_size=100534,
    hidden_size=2560,
    intermediate_size=1728,
    num_hidden_layers=28,
    num_attention_heads=32,
    num_experts=64,
    moe_top_k=6,
    num_shared_experts=2,
  ).items()
  if k != "num_key_value_heads"  # absent from the real config: MHA
}


def test_deepseek_v2_lite():
  c = from_hf_config(DEEPSEEK_V2_LITE)
  assert c.attention_type == "mla" and c.rope_interleave and c.q_lora_rank is None
  assert c.head_dim == 192 and c.rope_dim == 64 and c.num_kv_heads == 16
  assert c.moe_layer_ids == tuple(range(1, 27))
  assert (c.moe_intermediate_size, c.shared_intermediate_size, c.intermediate_size) == (1408, 2816, 10944)
  assert (c.num_experts, c.num_experts_per_tok, c.scoring_func, c.topk_method) == (64, 6, "softmax", "greedy")
  assert not c.norm_topk_prob and c.routed_scaling_factor == 1.0 and c.router_fp32 and not c.router_bias
  # The real model's softmax scale is multiplied by mscale(40, 0.707)**2 = 1.5896.
  assert softmax_scale(c) * 192**0.5 == pytest.approx(1.5896, abs=1e-4)


def test_yarn_matches_transformers():
  """Yarn frequencies and attention factor equal transformers' own, with mscale == and != mscale_all_dim."""
  for mscale in (0.707, 1.0):
    d = {**DEEPSEEK_V2_LITE, "rope_scaling": {**DEEPSEEK_V2_LITE["rope_scaling"], "mscale": mscale}}
    hf_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.DeepseekV2Config(**d))
    freq, factor = rope_frequencies(from_hf_config(d))
    np.testing.assert_allclose(np.asarray(freq), hf_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-12)


def test_yarn_factor_and_original_length_defaults():
  """Without a factor, yarn uses max_position_embeddings / original_max_position_embeddings."""
  scaling = {"type": "yarn", "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0}
  c = from_hf_config({**DEEPSEEK_V2_LITE, "rope_scaling": scaling})
  assert c.rope_scaling_dict["factor"] == 40.0
  c = from_hf_config({**DEEPSEEK_V2_LITE, "rope_scaling": {"type": "yarn", "factor": 4.0}})
  assert c.rope_scaling_dict["original_max_position_embeddings"] == 163840


def test_deepseek_v3_routing_fields():
  d = dict(
    DEEPSEEK_V2_LITE,
    model_type="deepseek_v3",
    q_lora_rank=1536,
    n_group=8,
    topk_group=4,
    n_routed_experts=256,
    num_experts_per_tok=8,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    first_k_dense_replace=3,
    head_dim=64,
    rope_interleave=False,
  )
  c = from_hf_config(d)
  assert (c.scoring_func, c.topk_method, c.n_group, c.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
  assert c.router_bias and c.norm_topk_prob and c.routed_scaling_factor == 2.5
  assert c.head_dim == 192 and c.q_lora_rank == 1536 and not c.rope_interleave
  assert c.moe_layer_ids[0] == 3
  assert from_hf_config({**d, "n_group": None, "topk_group": None}).n_group == 1


def test_deepseek_moe_16b():
  c = from_hf_config(DEEPSEEK_MOE_16B)
  assert c.attention_type == "gqa" and c.head_dim == 128 and c.rope_scaling is None
  assert c.moe_layer_ids == tuple(range(1, 28))
  assert (c.moe_intermediate_size, c.shared_intermediate_size, c.intermediate_size) == (1408, 2816, 10944)
  assert (c.num_experts, c.num_experts_per_tok, c.routed_scaling_factor, c.norm_topk_prob) == (64, 6, 1.0, False)
  assert layout_for(c).router == "gate"


@pytest.mark.parametrize(
  "overrides",
  [dict(moe_layer_freq=2, num_hidden_layers=7), dict(first_k_dense_replace=0, moe_layer_freq=3), {}],
)
def test_deepseek_moe_layer_placement_follows_remote_code(overrides):
  cfg = tiny_deepseek_config(**overrides)
  assert list(from_hf_config(cfg).moe_layer_ids) == moe_layer_indices(cfg)


def test_deepseek_norm_topk_prob_needs_two_experts():
  assert from_hf_config(tiny_deepseek_config(norm_topk_prob=True)).norm_topk_prob
  assert not from_hf_config(tiny_deepseek_config(norm_topk_prob=True, num_experts_per_tok=1)).norm_topk_prob


def test_xverse_moe_a4_2b():
  c = from_hf_config(XVERSE_MOE_A4_2B)
  assert c.head_dim == 80 and c.num_kv_heads == 32 and not c.attention_bias
  assert c.moe_layer_ids == tuple(range(28))
  assert (c.moe_intermediate_size, c.shared_intermediate_size) == (1728, 3456)
  assert (c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, c.routed_scaling_factor) == (64, 6, False, 1.0)
  assert hf_key(("layers", 3, "mlp", "router", "weight"), layout_for(c), True) == "model.layers.3.mlp.router.weight"
  assert hf_key(("layers", 3, "mlp", "shared", "mlp", "up_proj", "weight"), layout_for(c), True) == (
    "model.layers.3.mlp.shared_experts.up_proj.weight"
  )


def test_dense_xverse():
  c = from_hf_config(tiny_xverse_config(num_experts=None))
  assert c.moe_layer_ids == () and c.intermediate_size == 32 and c.shared_intermediate_size == 0


def test_unsupported_rope_type_is_rejected():
  with pytest.raises(UnsupportedModelError, match="rope_type 'longrope'"):
    from_hf_config(tiny_deepseek_config(rope_scaling={"type": "longrope", "factor": 2.0}))


def test_unsupported_v2_topk_method_is_rejected():
  with pytest.raises(UnsupportedModelError, match="topk_method 'noaux_tc'"):
    from_hf_config(dict(DEEPSEEK_V2_LITE, topk_method="noaux_tc"))


def test_config_is_hashable():
  c = from_hf_config(DEEPSEEK_V2_LITE)
  assert hash(c) == hash(dataclasses.replace(c))
