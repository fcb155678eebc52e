"""Logit and greedy-decode parity with HuggingFace transformers (float32).

Each case is a tiny random config that exercises one family's options; the
model is built in PyTorch, saved with `save_pretrained`, loaded with
`moejax.load` through the same safetensors path real checkpoints use.

The checks below take only the `pair` fixture; other parity modules import
them and run them on their own cases (`test_parity_deepseek.py`).
"""

import numpy as np
import transformers

from tests.models.hf_utils import hf_greedy, hf_logits, hf_pair_fixture

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

CASES = {
  "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
    **BASE,
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
  ),
  "qwen2_moe_norm_sparse_step_sliding": lambda: transformers.Qwen2MoeConfig(
    **{**BASE, "num_hidden_layers": 4},
    intermediate_size=96,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    num_experts=8,
    num_experts_per_tok=3,
    norm_topk_prob=True,
    decoder_sparse_step=2,
    use_sliding_window=True,
    sliding_window=5,
    max_window_layers=3,
  ),
  "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
    **BASE,
    head_dim=24,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    mlp_only_layers=[0],
  ),
  "mixtral": lambda: transformers.MixtralConfig(
    **BASE,
    intermediate_size=48,
    num_local_experts=6,
    num_experts_per_tok=2,
    sliding_window=6,
  ),
  "olmoe": lambda: transformers.OlmoeConfig(
    **BASE,
    intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=3,
    norm_topk_prob=False,
    clip_qkv=3.0,
  ),
}

ATOL = 1e-4
# Every check uses a batch of 2 and these lengths, so that each case compiles three programs only:
# the full forward of PROMPT + NEW tokens, the prefill of PROMPT tokens and one decode step.
PROMPT, NEW = 7, 8

pair = hf_pair_fixture(CASES)


def _ids(length, vocab, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (2, length)).astype(np.int64)


def assert_logits_close(ours: np.ndarray, ref: np.ndarray):
  """max |diff| <= ATOL, scaled up for logits larger than 10."""
  assert np.abs(ours - ref).max() <= ATOL * max(1.0, np.abs(ref).max() / 10)


def test_logits_match(pair):
  hf, model = pair.ref, pair.model
  ids = _ids(PROMPT + NEW, model.config.vocab_size)
  ours = np.asarray(model.forward(ids))
  ref = hf_logits(hf, ids)
  assert_logits_close(ours, ref)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_left_padded_batch_matches(pair):
  hf, model = pair.ref, pair.model
  ids = _ids(PROMPT + NEW, model.config.vocab_size, seed=1)
  mask = np.ones_like(ids)
  mask[0, :4] = 0
  mask[1, :2] = 0
  ours = np.asarray(model.forward(ids, mask))
  ref = hf_logits(hf, ids, mask)
  real = mask.astype(bool)
  assert_logits_close(ours[real], ref[real])


def test_incremental_decode_equals_full_forward(pair):
  model = pair.model
  tokens = model.generate(_ids(PROMPT, model.config.vocab_size, seed=2), max_new_tokens=NEW)
  full = np.asarray(model.forward(tokens))
  # Greedy tokens are the argmax of the full forward at each previous position.
  np.testing.assert_array_equal(tokens[:, PROMPT:], full[:, PROMPT - 1 : -1].argmax(-1))


def test_greedy_generation_matches_transformers(pair):
  hf, model = pair.ref, pair.model
  ids = _ids(PROMPT, model.config.vocab_size, seed=3)
  np.testing.assert_array_equal(model.generate(ids, max_new_tokens=NEW), hf_greedy(hf, ids, NEW))


def test_padded_greedy_generation_matches_transformers(pair):
  hf, model = pair.ref, pair.model
  ids = _ids(PROMPT, model.config.vocab_size, seed=4)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  np.testing.assert_array_equal(model.generate(ids, NEW, mask), hf_greedy(hf, ids, NEW, mask))
