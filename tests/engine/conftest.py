"""A tiny random Qwen2-MoE checkpoint shared by the engine tests."""

import pytest

import moejax
from tests.models.hf_utils import build_hf_model, tiny_qwen2_moe_config

NUM_EXPERTS, TOP_K = 8, 2


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
  config = tiny_qwen2_moe_config(num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, mlp_only_layers=[1])
  path = tmp_path_factory.mktemp("tiny_qwen2_moe")
  build_hf_model(config, path, seed=7)
  return path


@pytest.fixture(scope="session")
def host_model(tiny_path):
  return moejax.load(tiny_path, experts="host")


@pytest.fixture(scope="session")
def resident_model(tiny_path):
  return moejax.load(tiny_path)
