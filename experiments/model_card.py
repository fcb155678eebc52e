r"""Measures every number of a trained model's card and prints them as JSON.

  nice -n 10 python experiments/model_card.py --model=moejax/assets/default_moe \
      --train=third_party/world_english_bible/train.txt --heldout=third_party/world_english_bible/heldout.txt

Reports:
- parameters: total, routed, active per token (with and without embedding and LM head);
- training: steps, tokens, seconds and machine (from the export's training.json);
- held-out perplexity over non-overlapping windows of --seq_len tokens (each scored from
  its own start), from moejax (`Model.forward`) and from transformers, next to a unigram
  model's with the same tokenizer (add-one smoothed counts of the training split);
- routing, per MoE layer on the held-out tokens: entropy of expert usage (nats) vs log E,
  and temporal reuse, the fraction of a token's k experts that the previous token also
  chose, vs the chance level k / E;
- offloaded decoding with `moejax.engine.Engine` (teacher-forced on held-out text): smoe and
  lru with --cache_slots (default E / 4) slots per layer, smoe at --alpha: decode hit ratio
  and perplexity change against the exact model on the same tokens.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags
from flax import nnx

import moejax
from moejax.engine import Engine
from moejax.engine.stats import RunStats
from moejax.train import data
from moejax.train.model import forward

_MODEL = flags.DEFINE_string("model", None, "HF checkpoint directory (default: moejax.default_model_path()).")
_TRAIN = flags.DEFINE_string("train", "third_party/world_english_bible/train.txt", "Training split (unigram counts).")
_HELDOUT = flags.DEFINE_string("heldout", "third_party/world_english_bible/heldout.txt", "Held-out split.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per held-out window.")
_BATCH = flags.DEFINE_integer("batch", 16, "Windows per forward.")
_ALPHA = flags.DEFINE_float("alpha", 0.3, "smoe substitution threshold.")
_CACHE_SLOTS = flags.DEFINE_integer("cache_slots", None, "Expert slots per layer (default E / 4).")
_ENGINE_SEQS = flags.DEFINE_integer("engine_sequences", 16, "Held-out windows decoded by the engine.")
_ENGINE_BATCH = flags.DEFINE_integer("engine_batch", 4, "Sequences per engine call.")
_PROMPT = flags.DEFINE_integer("prompt", 32, "Prompt tokens of each engine window (prefilled exactly).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")


def parameter_counts(model: moejax.Model) -> dict[str, int]:
  """Total, routed and per-token active parameters of a loaded model."""
  c = model.config
  dense = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.state))
  routed = sum(int(np.prod(a.shape)) for w in model.experts if w is not None for a in w)
  active = dense + len(c.moe_layer_ids) * c.num_experts_per_tok * c.expert_param_count()
  embed_head = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
  return {
    "total": dense + routed,
    "routed_experts": routed,
    "active_per_token": active,
    "active_per_token_without_embedding_and_head": active - embed_head,
  }


@functools.partial(jax.jit, static_argnums=0)
def _chosen_experts(graphdef, state, experts, ids):
  """Per MoE layer: chosen experts `[B, T, k]` and the router's per-token entropy `[B, T]` (nats)."""
  _, routing = forward(nnx.merge(graphdef, state), experts, ids)
  entropy = [-(r.scores * jnp.log(jnp.maximum(r.scores, 1e-30))).sum(-1).reshape(ids.shape) for r in routing]
  return [r.experts.reshape(*ids.shape, -1) for r in routing], entropy


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def heldout_metrics(path: str, model: moejax.Model, windows: np.ndarray, batch: int) -> dict:
  """Perplexities (moejax, transformers) and per-layer routing statistics over windows `[W, T + 1]`."""
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  nll_ours, nll_hf, chosen, token_entropy = [], [], [], []
  experts = model.experts_on_device()
  for i in range(0, len(windows), batch):
    w = windows[i : i + batch]
    ids, targets = w[:, :-1], w[:, 1:]
    nll_ours.append(_nll(np.asarray(model.forward(ids)), targets))
    with torch.no_grad():
      nll_hf.append(_nll(hf(torch.tensor(ids, dtype=torch.long)).logits.numpy(), targets))
    layers, entropy = _chosen_experts(model.graphdef, model.state, experts, jnp.asarray(ids))
    chosen.append(np.stack([np.asarray(e) for e in layers]))
    token_entropy.append(np.stack([np.asarray(h) for h in entropy]))
  chosen = np.concatenate(chosen, axis=1)  # [L, W, T, k]
  token_entropy = np.concatenate(token_entropy, axis=1)  # [L, W, T]
  c = model.config
  e, k = c.num_experts, c.num_experts_per_tok
  layers = []
  for layer, sel, h in zip(c.moe_layer_ids, chosen, token_entropy):
    p = np.bincount(sel.reshape(-1), minlength=e) / sel.size
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    shared = (sel[:, 1:, :, None] == sel[:, :-1, None, :]).any(-1).sum(-1)  # [W, T-1] overlap with previous token
    layers.append(
      {
        "layer": layer,
        "usage_entropy": entropy,
        "usage_entropy_over_log_e": entropy / np.log(e),
        "max_usage_share": float(p.max()),
        "unused_experts": int((p == 0).sum()),
        "temporal_reuse": float(shared.mean() / k),
        # Usage is balanced by the auxiliary loss; specialisation shows in each token's router distribution.
        "token_router_entropy_over_log_e": float(h.mean() / np.log(e)),
      }
    )
  return {
    "tokens": int(windows[:, 1:].size),
    "perplexity_moejax": float(np.exp(np.concatenate(nll_ours).mean())),
    "perplexity_transformers": float(np.exp(np.concatenate(nll_hf).mean())),
    "routing": {"log_e": float(np.log(e)), "reuse_chance_k_over_e": k / e, "layers": layers},
  }


def unigram_perplexity(train_stream: np.ndarray, windows: np.ndarray, vocab: int) -> float:
  """Perplexity of add-one smoothed training-split token frequencies on the windows' targets."""
  logp = np.log((np.bincount(train_stream, minlength=vocab) + 1.0) / (len(train_stream) + vocab))
  return float(np.exp(-logp[windows[:, 1:]].mean()))


def engine_comparison(path: str, model: moejax.Model, windows: np.ndarray) -> dict:
  """smoe (alpha) vs lru at the same cache, teacher-forced decode of held-out windows."""
  c = model.config
  slots = _CACHE_SLOTS.value or c.num_experts // 4
  windows = windows[: _ENGINE_SEQS.value]
  prompt, forced = windows[:, : _PROMPT.value], windows[:, _PROMPT.value :]
  exact = np.concatenate(
    [
      -_nll(np.asarray(model.forward(w[:, :-1])), w[:, 1:])[:, _PROMPT.value - 1 :]
      for w in np.array_split(windows, max(1, len(windows) // _ENGINE_BATCH.value))
    ]
  )
  host = moejax.load(path, dtype="float32", experts="host")
  out = {
    "cache_slots": slots,
    "num_experts": c.num_experts,
    "alpha": _ALPHA.value,
    "sequences": len(windows),
    "prompt_tokens": _PROMPT.value,
    "decoded_tokens_per_sequence": forced.shape[1],
    "perplexity_exact": float(np.exp(-exact.mean())),
  }
  for policy, alpha in (("lru", 0.0), ("smoe", _ALPHA.value)):  # lru never substitutes: alpha does not apply
    engine = Engine(host, policy=policy, alpha=alpha, cache_slots=slots)
    stats = RunStats(c, dtype_bytes=4)
    logps = []
    for i in range(0, len(windows), _ENGINE_BATCH.value):
      res = engine.generate(
        prompt[i : i + _ENGINE_BATCH.value],
        forced.shape[1],
        forced_tokens=forced[i : i + _ENGINE_BATCH.value],
        run_stats=stats,
      )
      logps.append(res.logprobs)
    summary = stats.summary()
    ppl = float(np.exp(-np.concatenate(logps).mean()))
    out[policy] = {
      "hit_ratio": summary["hit_ratio"],
      "substitution_rate": summary["substitution_rate"],
      "perplexity": ppl,
      "perplexity_change": ppl / out["perplexity_exact"] - 1,
    }
  return out


def main(argv):
  del argv
  path = _MODEL.value or moejax.default_model_path()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  model = moejax.load(path, dtype="float32")  # the shipped model is stored in bfloat16
  heldout = data.windows(data.token_stream(tokenizer, data.read_documents(_HELDOUT.value)), _SEQ_LEN.value)
  train_stream = data.token_stream(tokenizer, data.read_documents(_TRAIN.value))
  with open(os.path.join(path, "training.json")) as f:
    training = json.load(f)
  card = {
    "model": path,
    "architecture": {
      k: getattr(model.config, k)
      for k in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_intermediate_size",
        "shared_expert_gate",
        "norm_topk_prob",
      )
    },
    "parameters": parameter_counts(model),
    "training": {
      k: training[k] for k in ("steps", "tokens", "epochs", "train_seconds", "machine", "seq_len", "batch_size")
    },
    "heldout": heldout_metrics(path, model, heldout, _BATCH.value),
    "unigram_perplexity": unigram_perplexity(train_stream, heldout, model.config.vocab_size),
    "train_tokens_in_split": len(train_stream),
    "engine": engine_comparison(path, model, heldout),
  }
  text = json.dumps(card, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
