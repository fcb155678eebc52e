"""The training loop: data, train state, jitted step, orbax checkpoints with resume, held-out eval, export.

`train(cfg, workdir)` is what `experiments/train.py` runs; `cfg` is the
`ml_collections.ConfigDict` of `configs/train_default.py`. In `workdir` it
keeps the tokenizer (`tokenizer/`), orbax checkpoints (`checkpoints/<step>/`)
and a JSON-lines log (`metrics.jsonl`). Started again with the same workdir,
it resumes from the newest checkpoint, and because a batch is a function of
the step, the resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx

from moejax.models.config import MoEConfig, from_hf_config
from moejax.train import checkpoint, data, export
from moejax.train.model import Params, forward, init_params, loss_fn
from moejax.train.optim import make_optimizer
from moejax.train.tokenizer import train_bpe_tokenizer

TrainState = dict[str, Any]  # {"step": int32 [], "params": Params, "opt_state": ..., "elapsed_s": float32 []}


def model_config(cfg, eos_token_id: int) -> tuple[dict[str, Any], MoEConfig]:
  """(HF config.json dict, MoEConfig) of `cfg.model`."""
  config_dict = export.qwen2_moe_config(**cfg.model.to_dict(), eos_token_id=eos_token_id)
  return config_dict, from_hf_config(config_dict)


def make_optimizer_from(cfg) -> optax.GradientTransformation:
  o = cfg.optim
  return make_optimizer(
    peak_lr=o.peak_lr,
    warmup_steps=o.warmup_steps,
    total_steps=cfg.total_steps,
    end_lr_fraction=o.end_lr_fraction,
    weight_decay=o.weight_decay,
    b1=o.b1,
    b2=o.b2,
    clip_norm=o.clip_norm,
  )


def init_train_state(
  config: MoEConfig, optimizer: optax.GradientTransformation, seed: int
) -> tuple[nnx.GraphDef, TrainState]:
  """(decoder graphdef, fresh train state at step 0)."""
  graphdef, params = init_params(config, jax.random.PRNGKey(seed))
  state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params), "elapsed_s": jnp.float32(0)}
  return graphdef, state


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, aux_coef: float, block: int):
  """A jitted `(state, batch [B, T + 1]) -> (state, metrics)`; the state's buffers are donated."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, graphdef, aux_coef=aux_coef, block=block), has_aux=True)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    (_, metrics), grads = grad_fn(state["params"], batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "elapsed_s": state["elapsed_s"]}
    return new, metrics

  return step


@functools.partial(jax.jit, static_argnums=(0, 3))
def _window_nll(graphdef, params: Params, windows: jax.Array, block: int) -> jax.Array:
  logits, _ = forward(nnx.merge(graphdef, params["decoder"]), params["experts"], windows[:, :-1], block)
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, windows[:, 1:, None], -1)[..., 0]


def heldout_nll(graphdef, params: Params, windows: np.ndarray, batch_size: int, block: int = 64) -> float:
  """Mean next-token negative log-likelihood (nats) over held-out windows `[W, T + 1]`."""
  total, count = 0.0, 0
  for i in range(0, len(windows), batch_size):
    nll = _window_nll(graphdef, params, jnp.asarray(windows[i : i + batch_size]), block)
    total += float(nll.sum())
    count += nll.size
  return total / count


def load_or_train_tokenizer(cfg, workdir: str, train_docs: list[str]):
  path = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(path):
    train_bpe_tokenizer(train_docs, cfg.model.vocab_size).save_pretrained(path)
  return transformers.AutoTokenizer.from_pretrained(path)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()


def _log(workdir: str, record: dict[str, Any]) -> None:
  print(json.dumps(record), flush=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")


def train(cfg, workdir: str) -> tuple[TrainState, list[dict[str, float]]]:
  """Trains (or resumes) to `cfg.total_steps`, then exports to `cfg.export_dir` if set.

  Returns:
    (final train state, the per-step metrics of the steps this call ran).
  """
  os.makedirs(workdir, exist_ok=True)
  train_docs = data.read_documents(cfg.data.train_path)
  tokenizer = load_or_train_tokenizer(cfg, workdir, train_docs)
  config_dict, config = model_config(cfg, tokenizer.eos_token_id)
  batches = data.Batches(data.windows(data.token_stream(tokenizer, train_docs), cfg.seq_len), cfg.batch_size, cfg.seed)
  heldout = data.windows(data.token_stream(tokenizer, data.read_documents(cfg.data.heldout_path)), cfg.seq_len)

  optimizer = make_optimizer_from(cfg)
  graphdef, state = init_train_state(config, optimizer, cfg.seed)
  manager = checkpoint.checkpoint_manager(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  restored = checkpoint.restore_latest(manager, state)
  if restored is not None:
    state = restored
    _log(workdir, {"event": "resumed", "step": int(state["step"])})
  step_fn = make_train_step(graphdef, optimizer, cfg.aux_loss_coef, cfg.expert_block)

  history = []
  t_last, tokens = time.perf_counter(), batches.tokens_per_step()
  while int(state["step"]) < cfg.total_steps:
    step = int(state["step"])
    state, metrics = step_fn(state, jnp.asarray(batches(step)))
    metrics = {k: float(v) for k, v in metrics.items()}
    now = time.perf_counter()
    state["elapsed_s"] = state["elapsed_s"] + (now - t_last)
    t_last = now
    history.append(metrics)
    done = step + 1
    if done % cfg.log_every == 0 or done == cfg.total_steps:
      _log(
        workdir,
        {
          "step": done,
          "epoch": done / batches.steps_per_epoch,
          **metrics,
          "elapsed_s": round(float(state["elapsed_s"]), 1),
          "tokens": done * tokens,
        },
      )
    if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.total_steps):
      nll = heldout_nll(graphdef, state["params"], heldout, cfg.batch_size, cfg.expert_block)
      _log(workdir, {"step": done, "heldout_nll": nll, "heldout_ppl": float(np.exp(nll))})
      t_last = time.perf_counter()  # evaluation time is not training time
    if done % cfg.checkpoint_every == 0 or done == cfg.total_steps:
      checkpoint.save(manager, state)
      t_last = time.perf_counter()

  manager.close()
  if cfg.export_dir:
    export.export_hf(cfg.export_dir, config_dict, state["params"], tokenizer, cfg.export_dtype)
    summary = {
      "steps": int(state["step"]),
      "tokens": int(state["step"]) * tokens,
      "seq_len": cfg.seq_len,
      "batch_size": cfg.batch_size,
      "train_seconds": round(float(state["elapsed_s"]), 1),
      "epochs": int(state["step"]) / batches.steps_per_epoch,
      "train_windows": len(batches.windows),
      "machine": f"{_cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})",
      "config": cfg.to_dict(),
    }
    with open(os.path.join(cfg.export_dir, "training.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return state, history
