"""alpha = 0 is lossless for every policy on every model family, each with its own router.

Softmax top-k (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-MoE, XVERSE-MoE),
group-limited greedy (DeepSeek-V2) and sigmoid scores with a selection bias over
groups (DeepSeek-V3 noaux_tc): with experts in host memory, a cache of k slots
per layer (the hardest budget) and alpha = 0, every registered policy must
decode the fully resident model's greedy tokens exactly and its log-probs to
float tolerance. The tiny random checkpoints are the parity tests' own configs.

Each case compiles its own decode program (about 7 s of CPU on 2 cores), so a
family costs about 1.5 CPU-minutes. The grouped routers run by default; the
softmax top-k families are marked slow (`--runslow`): Qwen2-MoE is also
covered at every budget by `test_engine.py`.
"""

import jax
import numpy as np
import pytest

import moejax
from moejax.engine import Engine
from moejax.scheduling import POLICIES
from tests.models import test_parity, test_parity_deepseek, test_parity_reference_families
from tests.models.hf_utils import build_hf_model
from tests.models.reference_models import build_reference, save_hub_checkpoint

# One case per family, by (parity module, case name).
FAMILIES = {
  "qwen2_moe": (test_parity, "qwen2_moe"),
  "qwen3_moe": (test_parity, "qwen3_moe"),
  "mixtral": (test_parity, "mixtral"),
  "olmoe": (test_parity, "olmoe"),
  "deepseek_v2_grouped": (test_parity_deepseek, "v2_yarn_grouped"),
  "deepseek_v3_noaux_tc": (test_parity_deepseek, "v3_noaux_grouped"),
  "deepseek_moe": (test_parity_reference_families, "deepseek"),
  "xverse_moe": (test_parity_reference_families, "xverse"),
}
FAST = ("deepseek_v2_grouped", "deepseek_v3_noaux_tc")
NEW = 6


def _checkpoint(family, path):
  module, case = FAMILIES[family]
  config = module.CASES[case]()
  if module is test_parity_reference_families:
    save_hub_checkpoint(build_reference(config, seed=len(case)), config, path)
  else:
    build_hf_model(config, path, seed=len(case))


@pytest.fixture(
  scope="module",
  params=[pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in sorted(FAMILIES)],
)
def family(request, tmp_path_factory):
  """(name, experts-on-host model, resident tokens, resident log-probs, prompts, mask) of one family."""
  path = tmp_path_factory.mktemp(request.param)
  _checkpoint(request.param, path)
  resident = moejax.load(path)
  vocab = resident.config.vocab_size
  prompts = np.random.RandomState(0).randint(0, vocab, (2, 7))
  mask = np.ones_like(prompts)
  mask[1, :3] = 0  # the second prompt is shorter (left padded)
  tokens = resident.generate(prompts, NEW, mask)
  logits = np.asarray(resident.forward(tokens, np.concatenate([mask, np.ones((2, NEW), int)], 1)))
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  t = prompts.shape[1]
  chosen = np.take_along_axis(logp[:, t - 1 : -1], tokens[:, t:, None], -1)[..., 0]
  return request.param, moejax.load(path, experts="host"), tokens, chosen, prompts, mask


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_alpha_zero_is_lossless(family, policy):
  name, model, tokens, logp, prompts, mask = family
  k = model.config.num_experts_per_tok
  result = Engine(model, policy=policy, alpha=0.0, cache_slots=k).generate(prompts, NEW, mask)
  np.testing.assert_array_equal(result.tokens, tokens, err_msg=f"{name} / {policy}")
  np.testing.assert_allclose(result.logprobs, logp, atol=2e-4, err_msg=f"{name} / {policy}")


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_alpha_zero_is_lossless_in_a_shared_pool(family, policy):
  """One pool of k slots for every MoE layer (cache_scope "global") on the grouped router (test_engine.py covers
  Qwen2-MoE's softmax top-k)."""
  name, model, tokens, logp, prompts, mask = family
  if name != "deepseek_v2_grouped":
    pytest.skip("the shared pool is checked on one grouped router")
  k = model.config.num_experts_per_tok
  result = Engine(model, policy=policy, alpha=0.0, cache_slots=k, cache_scope="global").generate(prompts, NEW, mask)
  np.testing.assert_array_equal(result.tokens, tokens, err_msg=f"{name} / {policy}")
  np.testing.assert_allclose(result.logprobs, logp, atol=2e-4, err_msg=f"{name} / {policy}")
