"""Training: grouped experts equal the model's, a few steps lower the loss, orbax resume is exact, export loads.

Everything runs on a tiny Qwen2-MoE (vocab 300, hidden 32, 8 experts) and a
few KB of the shipped corpus, so the module takes well under a minute.
"""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import moejax
from configs.train_default import get_config
from moejax.models import moe
from moejax.train import grouped, trainer
from moejax.train.model import forward
from tests.models.hf_utils import hf_logits

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "third_party", "world_english_bible")


def _tiny_config(tmp_path, **overrides) -> ml_collections.ConfigDict:
  blocks = (Path(CORPUS) / "train.txt").read_text(encoding="utf-8").split("\n\n")
  (tmp_path / "train.txt").write_text("\n\n".join(blocks[:12]), encoding="utf-8")
  (tmp_path / "heldout.txt").write_text("\n\n".join(blocks[12:14]), encoding="utf-8")
  cfg = get_config()
  cfg.data.train_path = str(tmp_path / "train.txt")
  cfg.data.heldout_path = str(tmp_path / "heldout.txt")
  cfg.model.update(
    dict(
      vocab_size=300,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      moe_intermediate_size=16,
      num_experts=8,
      num_experts_per_tok=2,
      shared_expert_intermediate_size=32,
    )
  )
  cfg.update(
    dict(
      seq_len=32,
      batch_size=8,
      total_steps=8,
      log_every=4,
      eval_every=0,
      checkpoint_every=4,
      expert_block=16,
      export_dir="",
      export_dtype="float32",
    )
  )
  cfg.optim.update(dict(warmup_steps=2, peak_lr=1e-2))
  cfg.update(overrides)
  return cfg


def test_grouped_experts_match_routed_experts_and_their_gradients():
  n, d, f, e, k = 40, 16, 8, 6, 3
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(keys[0], (n, d))
  shapes = [(e, f, d), (e, f, d), (e, d, f)]
  w = moe.ExpertWeights(*(0.3 * jax.random.normal(kk, s) for kk, s in zip(keys[1:4], shapes)))
  experts = jax.lax.top_k(jax.random.normal(keys[4], (n, e)), k)[1].astype(jnp.int32)
  mix = jax.nn.softmax(jax.random.normal(keys[4], (n, k)))

  def dense(x, w):  # every expert on every token, weighted by the sparse mix
    full = jnp.zeros((n, e)).at[jnp.arange(n)[:, None], experts].set(mix)
    h = jax.nn.silu(jnp.einsum("nd,efd->enf", x, w.gate)) * jnp.einsum("nd,efd->enf", x, w.up)
    return jnp.einsum("enf,edf,ne->nd", h, w.down, full)

  ours = grouped.grouped_experts(x, w, experts, mix, block=4)
  np.testing.assert_allclose(ours, moe.routed_experts(x, w, experts, mix), atol=1e-5)
  np.testing.assert_allclose(ours, dense(x, w), atol=1e-5)
  g_ours = jax.grad(lambda x, w: jnp.sum(grouped.grouped_experts(x, w, experts, mix, block=4) ** 2), (0, 1))(x, w)
  g_ref = jax.grad(lambda x, w: jnp.sum(dense(x, w) ** 2), (0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One uninterrupted 8-step run with checkpoints at steps 4 and 8, exported in float32."""
  tmp = tmp_path_factory.mktemp("train")
  cfg = _tiny_config(tmp, export_dir=str(tmp / "export"))
  state, history = trainer.train(cfg, str(tmp / "work"))
  return cfg, tmp, state, history


def test_training_lowers_the_loss(run):
  _, _, state, history = run
  assert int(state["step"]) == 8 and len(history) == 8
  assert history[-1]["ce"] < history[0]["ce"] - 0.5
  assert all(np.isfinite(h["loss"]) and h["balance"] > 0 for h in history)


def test_resume_from_orbax_checkpoint_repeats_the_same_losses(run):
  cfg, tmp, state, history = run
  work = tmp / "resumed"
  shutil.copytree(tmp / "work", work)
  shutil.rmtree(work / "checkpoints" / "8")  # as if the run had stopped after step 4's checkpoint
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.export_dir = ""
  resumed, resumed_history = trainer.train(cfg, str(work))
  assert len(resumed_history) == 4
  np.testing.assert_array_equal([h["loss"] for h in resumed_history], [h["loss"] for h in history[4:]])
  for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, b)
  events = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert {"event": "resumed", "step": 4} in events


def test_export_loads_in_moejax_and_transformers_with_the_training_logits(run):
  cfg, tmp, state, _ = run
  path = str(tmp / "export")
  ids = np.random.RandomState(0).randint(0, cfg.model.vocab_size, (2, 24))
  model = moejax.load(path)
  ours = np.asarray(model.forward(ids))
  trained = nnx.merge(model.graphdef, state["params"]["decoder"])
  train_logits, _ = forward(trained, state["params"]["experts"], jnp.asarray(ids))
  np.testing.assert_allclose(ours, np.asarray(train_logits), atol=1e-5)
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
  assert not any(info.values()), info
  np.testing.assert_allclose(ours, hf_logits(hf.eval(), ids), atol=1e-4)
  tok = transformers.AutoTokenizer.from_pretrained(path)
  assert tok.decode(tok("In the beginning")["input_ids"]) == "In the beginning"
