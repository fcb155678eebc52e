"""DeepSeek-V2/V3 (multi-head latent attention) parity with HuggingFace transformers (float32).

Runs the checks of `test_parity.py` (logits, left padding, incremental decode,
greedy and padded greedy generation) on tiny V2/V3 configs, and checks that
each routing/rope option the cases rely on actually changes the output, so
that the parity tests would notice it being ignored.
"""

import json
import shutil

import numpy as np
import transformers
from safetensors.numpy import load_file, save_file

import moejax
from tests.models.hf_utils import hf_logits, hf_pair_fixture
from tests.models.test_parity import (  # noqa: F401  the shared checks, run here on `pair` below
  NEW,
  PROMPT,
  _ids,
  test_greedy_generation_matches_transformers,
  test_incremental_decode_equals_full_forward,
  test_left_padded_batch_matches,
  test_logits_match,
  test_padded_greedy_generation_matches_transformers,
)

BASE = dict(
  vocab_size=97,
  hidden_size=64,
  num_hidden_layers=3,
  num_attention_heads=4,
  intermediate_size=96,
  moe_intermediate_size=32,
  kv_lora_rank=16,
  qk_nope_head_dim=16,
  qk_rope_head_dim=8,
  v_head_dim=12,
)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)

CASES = {
  # Plain q_proj, greedy top-k with routed scaling, one leading dense layer, attention biases.
  "v2_greedy": lambda: transformers.DeepseekV2Config(
    **BASE,
    q_lora_rank=None,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    routed_scaling_factor=1.5,
    attention_bias=True,
  ),
  # q LoRA, yarn (mscale == mscale_all_dim), group_limited_greedy. transformers ignores
  # moe_layer_freq and norm_topk_prob for V2; the case checks that moejax does too.
  "v2_yarn_grouped": lambda: transformers.DeepseekV2Config(
    **BASE,
    q_lora_rank=24,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=3,
    topk_method="group_limited_greedy",
    n_group=4,
    topk_group=2,
    moe_layer_freq=2,
    norm_topk_prob=True,
    max_position_embeddings=256,
    rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
  ),
  # noaux_tc over 4 groups with e_score_correction_bias, normalised and scaled weights,
  # interleaved rope, yarn with mscale != mscale_all_dim.
  "v3_noaux_grouped": lambda: transformers.DeepseekV3Config(
    **BASE,
    q_lora_rank=24,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    first_k_dense_replace=1,
    rope_interleave=True,
    max_position_embeddings=256,
    rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8},
  ),
  # rotate-half rope, unnormalised weights, no q LoRA, 2 groups keep 1, every layer MoE.
  "v3_halves_unnormalised": lambda: transformers.DeepseekV3Config(
    **BASE,
    q_lora_rank=None,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.7,
    first_k_dense_replace=0,
    rope_interleave=False,
  ),
}

pair = hf_pair_fixture(CASES)


def _without_correction_bias(tensors: dict) -> dict:
  return {k: np.zeros_like(v) if k.endswith("e_score_correction_bias") else v for k, v in tensors.items()}


# Per case, edits that each turn one option off: a dict updates config.json, a function rewrites the
# tensors. Each must move the logits well past the parity tolerance, so that the parity checks
# would catch moejax ignoring that option.
CONTROLS = {
  "v2_greedy": {"attention_bias": {"attention_bias": False}},
  "v2_yarn_grouped": {
    "group_limited_greedy": {"topk_method": "greedy"},
    # Same rope (attention_factor 1), but no mscale_all_dim**2 on the softmax scale.
    "yarn_softmax_mscale": {"rope_parameters": {**YARN, "mscale_all_dim": 0, "attention_factor": 1.0}},
  },
  "v3_noaux_grouped": {
    "noaux_tc_groups": {"n_group": 1, "topk_group": 1},
    "norm_topk_prob": {"norm_topk_prob": False},
    "e_score_correction_bias": _without_correction_bias,
  },
  "v3_halves_unnormalised": {"rope_interleave": {"rope_interleave": True}},
}


def test_each_option_changes_logits(pair, tmp_path):
  ids = _ids(PROMPT + NEW, pair.model.config.vocab_size)
  ref = hf_logits(pair.ref, ids)
  for option, edit in CONTROLS[pair.name].items():
    path = tmp_path / option
    shutil.copytree(pair.path, path)
    if callable(edit):
      save_file(edit(load_file(path / "model.safetensors")), path / "model.safetensors")
    else:
      config = json.loads((path / "config.json").read_text())
      (path / "config.json").write_text(json.dumps({**config, **edit}))
    diff = np.abs(np.asarray(moejax.load(path).forward(ids)) - ref).max()
    assert diff > 1e-2, f"{pair.name}: turning off {option} left the logits unchanged (max diff {diff})"


def test_bfloat16_runs_close_to_float32(pair):
  """bf16 weights and activations; the router (and V3's correction bias) stays float32, as in transformers."""
  model = moejax.load(pair.path, dtype="bfloat16")
  router = model.decoder.layers[-1].mlp.router
  assert router.weight[...].dtype == np.float32 and model.dtype == np.dtype("bfloat16")
  ids = _ids(PROMPT + NEW, model.config.vocab_size)
  logits, ref = np.asarray(model.forward(ids)), np.asarray(pair.model.forward(ids))
  assert np.abs(logits - ref).mean() <= 0.02 * np.abs(ref).max()
  assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
