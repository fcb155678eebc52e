"""Perplexity of a local text file under an `Engine`.

The text is tokenized as one stream and cut into lm-eval's rolling windows
(`scoring.rolling_windows`): each window holds at most `window` input tokens,
predicts tokens no earlier window predicted, and conditions on up to
`context` tokens before them (the first window on the BOS/EOS token). Every
token is predicted exactly once.

Two scoring paths (`moejax.eval.scoring`):
- "decode" (default): each window's context is prefilled and its predicted
  tokens are fed one by one through the decode path, so substitution and the
  expert cache act as they would while generating the text;
- "prefill": each window is scored in one prefill step (exact unless the
  engine has `policy_in_prefill`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from moejax.engine import Engine
from moejax.eval import scoring
from moejax.eval.tokenizer import file_tokens, prefix_token_id


@dataclasses.dataclass
class Perplexity:
  """nll: summed negative log-likelihood (nats) of `tokens` predicted tokens;
  perplexity = exp(nll / tokens); stats: the engine's `RunStats.summary` over the run."""

  nll: float
  tokens: int
  perplexity: float
  stats: dict[str, Any]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def token_perplexity(
  engine: Engine,
  tokens: Sequence[int],
  *,
  prefix_token: int,
  window: int,
  context: int = 1,
  batch_size: int = 1,
  mode: str = "decode",
  length_bucket: int = 32,
  desc: str = "perplexity",
) -> Perplexity:
  """Perplexity of a token stream over rolling windows (see the module docstring)."""
  pairs = scoring.rolling_windows(tokens, prefix_token, window, context)
  run = engine.new_run_stats()
  with tqdm(total=len(pairs), desc=desc, unit="window") as bar:
    scores = scoring.score_pairs(
      engine,
      pairs,
      max_length=window,
      batch_size=batch_size,
      mode=mode,
      length_bucket=length_bucket,
      run_stats=run,
      progress=bar,
    )
  nll = -sum(logp for logp, _ in scores)
  n = sum(len(pred) for _, pred in pairs)
  return Perplexity(nll=nll, tokens=n, perplexity=math.exp(nll / n) if n else float("nan"), stats=run.summary())


def file_perplexity(
  engine: Engine,
  tokenizer,
  path: str | os.PathLike,
  *,
  max_tokens: int | None = None,
  **kwargs,
) -> Perplexity:
  """Perplexity of a UTF-8 text file, tokenized as one stream (first `max_tokens` tokens if given).

  Keyword arguments are those of `token_perplexity` (window, context, batch_size, mode, ...).
  """
  tokens = file_tokens(tokenizer, path)
  tokens = tokens[:max_tokens] if max_tokens else tokens
  return token_perplexity(
    engine, tokens, prefix_token=prefix_token_id(tokenizer), desc=f"perplexity {os.path.basename(path)}", **kwargs
  )
