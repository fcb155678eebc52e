"""Logit and greedy-decode parity with HuggingFace transformers (float32).

Each case is a tiny random config that exercises one family's options; the
model is built in PyTorch, saved with `save_pretrained`, loaded with
`moejax.load` through the same safetensors path real checkpoints use.
"""

import numpy as np
import pytest
import transformers

import moejax
from tests.models.hf_utils import build_hf_model, hf_greedy, hf_logits

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

CASES = {
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **BASE, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
    ),
    "qwen2_moe_norm_sparse_step_sliding": lambda: transformers.Qwen2MoeConfig(
        **{**BASE, "num_hidden_layers": 4}, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
        decoder_sparse_step=2, use_sliding_window=True, sliding_window=5, max_window_layers=3,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **BASE, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **BASE, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2, sliding_window=6,
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **BASE, intermediate_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, clip_qkv=3.0,
    ),
}

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  hf = build_hf_model(CASES[request.param](), path, seed=len(request.param))
  return hf, moejax.load(path)


def _ids(batch, length, vocab, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int64)


def test_logits_match(pair):
  hf, model = pair
  ids = _ids(2, 11, model.config.vocab_size)
  ours = np.asarray(model.forward(ids))
  ref = hf_logits(hf, ids)
  assert np.abs(ours - ref).max() <= ATOL * max(1.0, np.abs(ref).max() / 10)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_left_padded_batch_matches(pair):
  hf, model = pair
  ids = _ids(3, 9, model.config.vocab_size, seed=1)
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  mask[2, :2] = 0
  ours = np.asarray(model.forward(ids, mask))
  ref = hf_logits(hf, ids, mask)
  real = mask.astype(bool)
  assert np.abs(ours[real] - ref[real]).max() <= ATOL * max(1.0, np.abs(ref).max() / 10)


def test_incremental_decode_equals_full_forward(pair):
  _, model = pair
  ids = _ids(2, 10, model.config.vocab_size, seed=2)
  tokens = model.generate(ids[:, :6], max_new_tokens=4)
  full = np.asarray(model.forward(tokens))
  # Greedy tokens are the argmax of the full forward at each previous position.
  np.testing.assert_array_equal(tokens[:, 6:], full[:, 5:-1].argmax(-1))


def test_greedy_generation_matches_transformers(pair):
  hf, model = pair
  ids = _ids(2, 7, model.config.vocab_size, seed=3)
  np.testing.assert_array_equal(model.generate(ids, max_new_tokens=8), hf_greedy(hf, ids, 8))


def test_padded_greedy_generation_matches_transformers(pair):
  hf, model = pair
  ids = _ids(2, 7, model.config.vocab_size, seed=4)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  np.testing.assert_array_equal(model.generate(ids, 6, mask), hf_greedy(hf, ids, 6, mask))
