"""Batched scoring of (context, continuation) token pairs through an `Engine`.

Two paths:
- "decode": prefill the context, then feed the continuation token by token
  through the decode path (`Engine.generate` with `forced_tokens`), so
  substitution and the expert cache act on exactly the tokens they would act
  on while generating the continuation.
- "prefill": one prefill step over context + continuation (`Engine.score`);
  exact unless the engine has `policy_in_prefill`.

Pairs are sorted by length and batched; contexts are left padded and
continuations right padded (padded positions are ignored). Prompt and KV
cache lengths are padded up to multiples of `length_bucket`, so that the
engine's jitted stages see few distinct shapes (each new shape compiles them
again). Batches hold `batch_size` pairs, the last one possibly fewer: the
engine refuses rows that are all padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from lm_eval import utils as lm_eval_utils

from moejax import validation
from moejax.engine import Engine
from moejax.engine.stats import RunStats

SCORING_MODES = ("decode", "prefill")

Pair = tuple[Sequence[int], Sequence[int]]


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
  """Drops tokens from the left so that context + continuation[:-1] fits in max_length.

  Keeps at least one context token; a continuation longer than max_length
  keeps its last max_length tokens. `context` must not be empty.
  """
  n = min(len(continuation), max_length)
  whole = (list(context) + list(continuation))[-(max_length + 1) :]
  return whole[:-n], whole[-n:]


def rolling_windows(tokens: Sequence[int], prefix_token: int, window: int, context: int) -> list[Pair]:
  """lm-eval's rolling windows: (context, predicted tokens) pairs predicting each token once.

  Args:
    tokens: the token stream.
    prefix_token: what the first token is conditioned on (BOS/EOS).
    window: most input tokens of one window (context + predicted - 1).
    context: tokens of overlap each later window conditions on (1 <= context < window);
      the last window conditions on as many as fit.
  """
  if not 1 <= context < window:
    raise ValueError(f"need 1 <= context < window, got context={context}, window={window}.")
  return [
    lm_eval_utils.make_disjoint_window(w)
    for w in lm_eval_utils.get_rolling_token_windows(list(tokens), prefix_token, window, context)
  ]


def pad_rows(seqs: Sequence[Sequence[int]], length: int, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
  """B token lists -> (ids `[B, length]` int32, mask `[B, length]` bool), padded on the left or the right."""
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, seq in enumerate(seqs):
    span = slice(length - len(seq), length) if left else slice(0, len(seq))
    ids[i, span], mask[i, span] = seq, True
  return ids, mask


def length_batches(lengths: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
  """Indices sorted by length key, longest first, cut into batches of batch_size."""
  order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
  return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_pairs(
  engine: Engine,
  pairs: Sequence[Pair],
  *,
  max_length: int,
  batch_size: int = 1,
  mode: str = "decode",
  length_bucket: int = 32,
  reset_cache: bool = False,
  run_stats: RunStats | None = None,
  progress=None,
) -> list[tuple[float, bool]]:
  """Log-likelihood of each continuation given its context.

  Args:
    engine: the `Engine` (its policy, alpha and cache state apply).
    pairs: (context tokens, continuation tokens), ids in the model's
      vocabulary; contexts must not be empty (condition on a BOS/EOS token).
    max_length: longest input the model may see (contexts are truncated), >= 1.
    batch_size: pairs per engine call, >= 1.
    mode: "decode" or "prefill" (see the module docstring).
    length_bucket: pad lengths up to multiples of this (>= 1).
    reset_cache: empty the engine's expert cache before every batch.
    run_stats: a `RunStats` to accumulate the engine's statistics into.
    progress: optional object with `update(n)` (a tqdm bar), told per batch.

  Returns:
    Per pair (sum of the continuation's token log-probabilities, whether
    every continuation token was the argmax); (0.0, True) for an empty one.
  """
  if mode not in SCORING_MODES:
    raise ValueError(f"mode={mode!r}; use one of {SCORING_MODES}.")
  max_length = validation.count(max_length, name="max_length", minimum=1)
  batch_size = validation.count(batch_size, name="batch_size", minimum=1)
  length_bucket = validation.count(length_bucket, name="length_bucket", minimum=1)
  pairs = validation.token_pairs(pairs, vocab_size=engine.config.vocab_size)
  pairs = [truncate(ctx, cont, max_length) if cont else (ctx, cont) for ctx, cont in pairs]
  results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
  todo = [i for i, (_, cont) in enumerate(pairs) if cont]
  lengths = [(len(pairs[i][1]), len(pairs[i][0])) for i in todo]
  for batch in length_batches(lengths, batch_size):
    rows = [todo[j] for j in batch]
    ctxs = [pairs[i][0] for i in rows]
    conts = [pairs[i][1] for i in rows]
    n = max(len(c) for c in conts)
    if reset_cache:
      engine.reset()
    if mode == "decode":
      t = round_up(max(len(c) for c in ctxs), length_bucket)
      ids, mask = pad_rows(ctxs, t, left=True)
      forced, forced_mask = pad_rows(conts, n, left=False)
      out = engine.generate(
        ids,
        n,
        mask,
        forced_tokens=forced,
        forced_mask=forced_mask,
        run_stats=run_stats,
        cache_length=round_up(t + n, length_bucket),
      )
      logp, greedy, keep = out.logprobs, out.greedy, forced_mask
    else:
      seqs = [list(ctx) + list(cont) for ctx, cont in zip(ctxs, conts)]
      ids, mask = pad_rows(seqs, round_up(max(map(len, seqs)), length_bucket), left=True)
      logp, greedy = engine.score(ids, mask, run_stats=run_stats)
      # Right-align each continuation's scores at the end of its row: [B, n].
      logp, greedy = logp[:, -n:], greedy[:, -n:]
      _, keep = pad_rows(conts, n, left=True)
    for r, i in enumerate(rows):
      results[i] = (float(logp[r][keep[r]].sum()), bool(greedy[r][keep[r]].all()))
    if progress is not None:
      progress.update(len(rows))
  return results
