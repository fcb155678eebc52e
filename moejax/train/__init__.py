"""Training small MoE language models with optax: init, loss, optimizer, orbax checkpoints, HF export."""

from moejax.train.export import export_hf, qwen2_moe_config
from moejax.train.model import forward, init_params, load_balancing_loss, loss_fn
from moejax.train.optim import make_optimizer
from moejax.train.tokenizer import train_bpe_tokenizer
from moejax.train.trainer import train

__all__ = [
  "export_hf",
  "forward",
  "init_params",
  "load_balancing_loss",
  "loss_fn",
  "make_optimizer",
  "qwen2_moe_config",
  "train",
  "train_bpe_tokenizer",
]
