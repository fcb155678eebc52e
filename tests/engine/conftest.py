"""A tiny random Qwen2-MoE checkpoint shared by the engine tests."""

import pytest
import transformers

import moejax
from tests.models.hf_utils import build_hf_model

NUM_EXPERTS, TOP_K = 8, 2


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
  config = transformers.Qwen2MoeConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=NUM_EXPERTS,
    num_experts_per_tok=TOP_K,
    mlp_only_layers=[1],
    norm_topk_prob=False,
  )
  path = tmp_path_factory.mktemp("tiny_qwen2_moe")
  build_hf_model(config, path, seed=7)
  return path


@pytest.fixture(scope="session")
def host_model(tiny_path):
  return moejax.load(tiny_path, experts="host")


@pytest.fixture(scope="session")
def resident_model(tiny_path):
  return moejax.load(tiny_path)
