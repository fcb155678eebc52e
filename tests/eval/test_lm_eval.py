"""The lm-eval adapter against direct computations with the resident model."""

import jax
import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from moejax.engine import Engine
from moejax.eval import scoring
from moejax.eval.lm_eval import MoejaxLM, parse_options
from moejax.eval.tasks import task_manager
from moejax.eval.tokenizer import load_tokenizer

CONTEXTS = ["The opposite of hot is", "Question: What is two plus three?\nAnswer:", "", "A small river runs "]
CONTINUATIONS = [" cold", " five", "Paris", "through the town"]
# One batch size and length bucket everywhere: the engine's jitted stages compile once per shape.
SHAPES = {"batch_size": 4, "max_length": 16, "length_bucket": 16}
TEXTS = ["The sun is a star.", "Plants need light, water and air to grow. Their leaves take in light from the sun."]


def forward_logprobs(model, tokens, length: int = 32):
  """log p(tokens[i] | tokens[:i]) for i >= 1 and argmax flags `[len - 1]`, from one resident forward.

  Left-pads to `length` (masked), so that every direct computation shares one compilation.
  """
  ids, mask = scoring.pad_rows([tokens], length, left=True)
  logits = np.asarray(model.forward(ids, mask))[0, length - len(tokens) :]
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  return logp[np.arange(len(tokens) - 1), tokens[1:]], logits.argmax(-1)[:-1] == np.asarray(tokens[1:])


def direct_score(model, ctx, cont):
  logp, greedy = forward_logprobs(model, list(ctx) + list(cont))
  return logp[-len(cont) :].sum(), greedy[-len(cont) :].all()


@pytest.fixture(scope="module")
def lm(host_model, tokenizer):
  """smoe at alpha = 0 with a cache smaller than the experts: exact, but through offloading."""
  return MoejaxLM(Engine(host_model, policy="smoe", alpha=0.0, cache_slots=3), tokenizer, **SHAPES)


def requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_matches_forward(lm, resident_model):
  results = lm.loglikelihood(requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS))))
  for (ctx, cont), (logp, greedy) in zip((lm._encode_pair(c, t) for c, t in zip(CONTEXTS, CONTINUATIONS)), results):
    ctx, cont = scoring.truncate(ctx, cont, lm.max_length)
    want_logp, want_greedy = direct_score(resident_model, ctx, cont)
    np.testing.assert_allclose(logp, want_logp, atol=2e-4)
    assert greedy == want_greedy
  assert lm.stats()["decode_steps"] > 0


def test_encode_pair_moves_trailing_space(lm, tokenizer):
  ctx, cont = lm._encode_pair("A small river runs ", "through")
  assert tokenizer.decode(ctx) == "A small river runs" and tokenizer.decode(cont) == " through"
  assert lm._encode_pair("", "Paris")[0] == [tokenizer.eos_token_id]


def test_loglikelihood_rolling_matches_forward(lm, resident_model, tokenizer):
  results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
  short = tokenizer.encode(TEXTS[0])
  assert len(short) < lm.max_length  # one window: the whole text after the prefix token
  np.testing.assert_allclose(
    results[0], forward_logprobs(resident_model, [tokenizer.eos_token_id] + short)[0].sum(), atol=2e-4
  )
  long = tokenizer.encode(TEXTS[1])
  windows = list(
    map(
      lm_eval.utils.make_disjoint_window,
      lm_eval.utils.get_rolling_token_windows(long, tokenizer.eos_token_id, lm.max_length, 1),
    )
  )
  assert len(windows) > 2 and sum(len(pred) for _, pred in windows) == len(long)
  want = sum(direct_score(resident_model, ctx, pred)[0] for ctx, pred in windows)
  np.testing.assert_allclose(results[1], want, atol=5e-4)


def test_generate_until_matches_model_generate(lm, resident_model, tokenizer):
  prompts = CONTEXTS[:2] + ["The sun"]
  contexts = [tokenizer.encode(p)[-(lm.max_length - 6) :] for p in prompts]  # what fits beside 6 new tokens
  ids, mask = scoring.pad_rows(contexts, lm.max_length, left=True)
  ref = [tokenizer.decode(row) for row in resident_model.generate(ids, 6, mask)[:, lm.max_length :]]
  out = lm.generate_until(
    requests("generate_until", [(p, {"until": ["\x00never"], "max_gen_toks": 6}) for p in prompts])
  )
  assert out == ref
  # A stop string cuts the text before it.
  stop = ref[0][2:4]
  cut = lm.generate_until(requests("generate_until", [(prompts[0], {"until": [stop], "max_gen_toks": 6})]))
  assert cut == [ref[0].split(stop)[0]]


def test_prefill_scoring_matches_decode_scoring(lm):
  pairs = [lm._encode_pair(c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
  decode = scoring.score_pairs(lm.engine, pairs, max_length=16, batch_size=4, length_bucket=16)
  prefill = scoring.score_pairs(lm.engine, pairs, max_length=16, batch_size=4, length_bucket=16, mode="prefill")
  np.testing.assert_allclose([d[0] for d in decode], [p[0] for p in prefill], atol=2e-4)
  assert [d[1] for d in decode] == [p[1] for p in prefill]


def test_parse_options():
  opts = parse_options(
    {
      "alpha": "0.25",
      "cache_slots": "4",
      "policy_in_prefill": "true",
      "cache_bytes": "none",
      "batch_size": 2,
      "policy": "smoe",
    }
  )
  assert opts == {
    "alpha": 0.25,
    "cache_slots": 4,
    "policy_in_prefill": True,
    "cache_bytes": None,
    "batch_size": 2,
    "policy": "smoe",
  }
  with pytest.raises(ValueError, match="Unknown moejax model_args"):
    parse_options({"alpah": "0.1"})
  with pytest.raises(ValueError, match="not an integer"):
    parse_options({"cache_slots": "4.5"})


def test_from_options_builds_the_engine(eval_path):
  lm = MoejaxLM.create_from_arg_string(
    f"pretrained={eval_path},policy=lru,alpha=0.2,cache_slots=3,policy_in_prefill=true,max_length=32",
    {"batch_size": "2", "device": None},
  )
  assert (lm.engine.spec.name, lm.engine.num_slots, lm.engine.options.policy_in_prefill) == ("lru", 3, True)
  assert (lm.engine.options.alpha, lm.batch_size, lm.max_length) == (pytest.approx(0.2), 2, 32)


def test_alpha_zero_scores_equal_resident(eval_path):
  """lm-eval through the registered "moejax" model: smoe at alpha = 0 scores like the resident policy."""

  def run(**engine):
    return lm_eval.simple_evaluate(
      model="moejax",
      model_args={"pretrained": str(eval_path), **SHAPES, **engine},
      tasks=["moejax_capitals"],
      limit=4,
      task_manager=task_manager(include_defaults=False),
      bootstrap_iters=0,
    )

  resident = run(policy="resident")
  smoe = run(policy="smoe", alpha=0.0, cache_slots=2)
  assert smoe["results"]["moejax_capitals"] == resident["results"]["moejax_capitals"]
  logps = [
    [np.asarray([r[0] for r in s["resps"]], float) for s in res["samples"]["moejax_capitals"]]
    for res in (resident, smoe)
  ]
  np.testing.assert_allclose(np.concatenate(logps[0]), np.concatenate(logps[1]), atol=2e-4)


def test_tokenizer_from_another_directory(tmp_path, eval_path, tokenizer):
  with pytest.raises(ValueError, match="pass tokenizer=PATH"):
    load_tokenizer(tmp_path)
  assert load_tokenizer(tmp_path, tokenizer=eval_path).encode("The sun") == tokenizer.encode("The sun")
