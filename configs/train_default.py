r"""Trains moejax's default small Qwen2-MoE on the World English Bible and exports it.

  nice -n 10 python experiments/train.py --config=configs/train_default.py \
      --workdir=/tmp/moejax_train --config.export_dir=moejax/assets/default_moe

Started again with the same --workdir it resumes from the newest orbax
checkpoint. `--config.x=y` overrides any field, e.g.
`--config.total_steps=20 --config.optim.warmup_steps=2` for a smoke run.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(
    dict(
      train_path="third_party/world_english_bible/train.txt",
      heldout_path="third_party/world_english_bible/heldout.txt",
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      vocab_size=4096,
      hidden_size=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      moe_intermediate_size=32,
      num_experts=64,
      num_experts_per_tok=4,
      shared_expert_intermediate_size=128,
      norm_topk_prob=False,
      max_position_embeddings=2048,
      rope_theta=10000.0,
      rms_norm_eps=1e-6,
    )
  )
  c.seq_len = 256
  c.batch_size = 32
  c.total_steps = 350
  c.optim = ml_collections.ConfigDict(
    dict(
      peak_lr=3e-3,
      warmup_steps=30,
      end_lr_fraction=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      clip_norm=1.0,
    )
  )
  c.aux_loss_coef = 0.01
  c.expert_block = 64  # rows per block of the grouped expert matmul (moejax.train.grouped)
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.export_dir = ""
  c.export_dtype = "bfloat16"
  return c
