"""Tiny random HuggingFace models for parity tests (PyTorch is a test-only dependency)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import pytest
import torch
import transformers

import moejax


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
  """Re-draws every parameter so that logits, routing and norms are far from trivial.

  HF initialises norms to one and linear layers with std 0.02, which makes
  logits nearly constant; parity on such a model proves little.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if p.ndim == 1 and "norm" in name:
        p.copy_(1.0 + 0.1 * noise)
      else:
        p.copy_(std * noise)
    for name, b in model.named_buffers():
      if "e_score_correction_bias" in name:
        b.copy_(0.05 * torch.randn(b.shape, generator=gen))
  return model


def tiny_qwen2_moe_config(**overrides) -> transformers.Qwen2MoeConfig:
  """The tiny Qwen2-MoE the engine, eval and validation tests decode with; keywords override its fields.

  Hidden 32, 4 heads (2 KV), dense width 48, 8 routed experts of width 16 and
  a gated shared expert of width 24, top-2 without renormalisation, 3 layers,
  vocabulary 61.
  """
  fields = dict(
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
    norm_topk_prob=False,
  )
  return transformers.Qwen2MoeConfig(**{**fields, **overrides})


def build_hf_model(config: transformers.PretrainedConfig, path, seed: int = 0) -> torch.nn.Module:
  """Creates a random float32 HF causal LM from `config`, saves it to `path`, returns it in eval mode."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  randomize_(model, seed)
  model.eval()
  model.save_pretrained(path)
  return model


def hf_logits(model: torch.nn.Module, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  with torch.no_grad():
    kwargs = {}
    if attention_mask is not None:
      kwargs["attention_mask"] = torch.tensor(attention_mask)
      kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(attention_mask, 1) - 1, 0))
    return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def hf_greedy(model: torch.nn.Module, ids: np.ndarray, max_new_tokens: int, attention_mask=None) -> np.ndarray:
  with torch.no_grad():
    # An explicit mask: otherwise generate() treats every pad_token_id in the prompt as padding.
    mask = np.ones_like(ids) if attention_mask is None else attention_mask
    out = model.generate(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      max_new_tokens=max_new_tokens,
      min_new_tokens=max_new_tokens,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=None,
    )
  return out.numpy()


class Pair(NamedTuple):
  """A parity case: the PyTorch reference (HF or `reference_models`), moejax's load of its
  checkpoint, the case name and the checkpoint directory."""

  ref: torch.nn.Module
  model: moejax.Model
  name: str
  path: str


def hf_pair_fixture(cases: Mapping[str, Callable[[], transformers.PretrainedConfig]]):
  """A module-scoped fixture `pair` (a `Pair`), one per case.

  Each case is saved with `save_pretrained` and loaded through the same
  safetensors path real checkpoints use.
  """

  @pytest.fixture(scope="module", params=sorted(cases))
  def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(cases[request.param](), path, seed=len(request.param))
    return Pair(hf, moejax.load(path), request.param, str(path))

  return pair
