"""AdamW with linear warm-up and cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, end_fraction: float) -> optax.Schedule:
  """0 -> `peak` linearly over `warmup_steps`, then cosine to `end_fraction * peak` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=end_fraction * peak,
  )


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
  *,
  peak_lr: float,
  warmup_steps: int,
  total_steps: int,
  end_lr_fraction: float = 0.1,
  weight_decay: float = 0.1,
  b1: float = 0.9,
  b2: float = 0.95,
  clip_norm: float = 1.0,
) -> optax.GradientTransformation:
  """The training optimizer; weight decay applies to parameters with >= 2 dims (not norms or biases)."""
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}): lower it.")
  schedule = learning_rate_schedule(peak_lr, warmup_steps, total_steps, end_lr_fraction)
  return optax.chain(
    optax.clip_by_global_norm(clip_norm),
    optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask),
  )
