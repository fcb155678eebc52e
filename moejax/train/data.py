"""Token streams and deterministic batches for language-model training.

Documents are tokenized, each preceded by the EOS token (so every document
starts from the same separator), concatenated, and cut into windows of
`seq_len + 1` tokens with stride `seq_len` (inputs and next-token targets).
The order of training windows is a fixed function of (seed, step), so a run
resumed from a checkpoint at step s sees exactly the batches that an
uninterrupted run sees from step s on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def read_documents(path: str) -> list[str]:
  """A text file of blank-line separated documents -> the documents (chapters of the corpus)."""
  with open(path, encoding="utf-8") as f:
    return [d.strip("\n") for d in f.read().split("\n\n") if d.strip()]


def token_stream(tokenizer, documents: Sequence[str]) -> np.ndarray:
  """[EOS, doc_0 ..., EOS, doc_1 ..., ...] as int32 `[n_tokens]`."""
  eos = tokenizer.eos_token_id
  encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
  return np.concatenate([np.asarray([eos, *ids], np.int32) for ids in encoded])


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """Non-overlapping windows `[W, seq_len + 1]`: window w covers tokens `[w * seq_len, (w + 1) * seq_len]`.

  Consecutive windows share one token (the last target of one is the first
  input of the next), so every token but the first is a target exactly once.
  The incomplete tail is dropped.
  """
  n = (len(stream) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return stream[idx]


class Batches:
  """Shuffled training batches `[batch_size, seq_len + 1]` indexed by step.

  Each epoch is a fresh permutation of the windows (seeded by `seed` and the
  epoch number); the last incomplete batch of an epoch is skipped.
  """

  def __init__(self, windows_: np.ndarray, batch_size: int, seed: int):
    if len(windows_) < batch_size:
      raise ValueError(f"Only {len(windows_)} windows for batch_size={batch_size}: use more text or a smaller batch.")
    self.windows = windows_
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = len(windows_) // batch_size

  def tokens_per_step(self) -> int:
    """Target tokens per batch."""
    return self.batch_size * (self.windows.shape[1] - 1)

  def __call__(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
    return self.windows[order[i * self.batch_size : (i + 1) * self.batch_size]]
