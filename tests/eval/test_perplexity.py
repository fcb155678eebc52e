"""Perplexity over rolling windows: decode path, prefill path and a direct computation agree at alpha = 0."""

import math

import numpy as np
import pytest

from moejax.engine import Engine
from moejax.eval import perplexity, scoring
from moejax.eval.tasks import PARAGRAPHS_PATH
from tests.eval.test_lm_eval import SHAPES, direct_score

WINDOW = SHAPES["max_length"]


@pytest.fixture(scope="module")
def engine(host_model):
  return Engine(host_model, policy="smoe", alpha=0.0, cache_slots=3)


def test_rolling_windows_predict_each_token_once():
  tokens = list(range(10, 40))
  windows = scoring.rolling_windows(tokens, 0, window=8, context=3)
  assert [t for _, pred in windows for t in pred] == tokens
  assert windows[0] == ([0], tokens[:8])  # disjoint: the first window predicts from the prefix token on
  assert all(
    len(ctx) + len(pred) - 1 <= 8 and ctx == tokens[tokens.index(pred[0]) - len(ctx) : tokens.index(pred[0])]
    for ctx, pred in windows[1:]
  )
  with pytest.raises(ValueError, match="context < window"):
    scoring.rolling_windows(tokens, 0, window=8, context=8)


def test_file_perplexity_decode_and_prefill_match_forward(engine, resident_model, tokenizer):
  kw = dict(
    window=WINDOW, context=4, batch_size=SHAPES["batch_size"], length_bucket=SHAPES["length_bucket"], max_tokens=40
  )
  decode = perplexity.file_perplexity(engine, tokenizer, PARAGRAPHS_PATH, **kw)
  prefill = perplexity.file_perplexity(engine, tokenizer, PARAGRAPHS_PATH, mode="prefill", **kw)
  with open(PARAGRAPHS_PATH) as f:
    tokens = tokenizer.encode(f.read())[:40]
  windows = scoring.rolling_windows(tokens, tokenizer.eos_token_id, WINDOW, 4)
  nll = -sum(direct_score(resident_model, ctx, pred)[0] for ctx, pred in windows)
  assert decode.tokens == prefill.tokens == 40
  np.testing.assert_allclose([decode.nll, prefill.nll], [nll, nll], rtol=1e-5)
  assert decode.perplexity == pytest.approx(math.exp(nll / 40), rel=1e-5)
  assert decode.stats["decode_steps"] > 0 and prefill.stats["decode_steps"] == 0
