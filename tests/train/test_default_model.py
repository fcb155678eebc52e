"""The shipped default model loads in moejax and transformers with the same logits (float32)."""

import os

import numpy as np
import pytest
import torch
import transformers

import moejax
from tests.models.hf_utils import hf_greedy, hf_logits

PATH = moejax.default_model_path()
ATOL = 1e-4
TEXT = "Then Jesus said to his disciples, “Let us go over to the other side of the lake.”"


@pytest.fixture(scope="module")
def models():
  tokenizer = transformers.AutoTokenizer.from_pretrained(PATH)
  hf = transformers.AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()
  return tokenizer, hf, moejax.load(PATH, dtype="float32")  # stored in bfloat16


def test_shipped_files():
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
    assert os.path.isfile(os.path.join(PATH, name)), name
  assert sum(os.path.getsize(os.path.join(PATH, f)) for f in os.listdir(PATH)) < 20 * 2**20


def test_config_is_a_fine_grained_qwen2_moe(models):
  _, hf, model = models
  assert hf.config.model_type == "qwen2_moe"
  c = model.config
  assert c.num_experts >= 32 and c.num_experts_per_tok >= 4 and c.shared_expert_gate
  assert all(c.moe_layers)


def test_logits_match_transformers(models):
  tokenizer, hf, model = models
  ids = np.asarray([tokenizer(TEXT)["input_ids"]])
  ref = hf_logits(hf, ids)
  ours = np.asarray(model.forward(ids))
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_generation_matches_transformers(models):
  tokenizer, hf, model = models
  ids = np.asarray([tokenizer("In the beginning")["input_ids"]])
  ours = model.generate(ids, max_new_tokens=8)
  np.testing.assert_array_equal(ours, hf_greedy(hf, ids, 8))
  assert tokenizer.decode(ours[0]).startswith("In the beginning")
