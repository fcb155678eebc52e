"""Bad input at every public entry point raises a ValueError naming the argument; good input runs.

Hypothesis draws one case per example: a good batch, or the same batch with
one argument broken (out-of-vocabulary, negative, fractional, bool or string
ids, a wrong shape, an all-padding or right-padded row, a bad mask, a bad
forced continuation, a bad generation option). Good cases must return the
documented shapes; bad cases must raise ValueError whose message names the
broken argument, and nothing else may escape. Shapes stay fixed where the
entry point compiles, so each program compiles once.
"""

import pathlib

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
import transformers
from lm_eval.api.instance import Instance

import moejax
from moejax import validation
from moejax.engine import Engine, sampling
from moejax.eval import scoring
from moejax.eval.lm_eval import MoejaxLM
from moejax.eval.tasks import TASKS_DIR
from moejax.models import model as model_lib
from tests.eval.conftest import build_tokenizer
from tests.models.hf_utils import build_hf_model, tiny_qwen2_moe_config

VOCAB, TOP_K = 320, 2
B, T, N = 2, 6, 3  # the fixed batch of the fuzzed calls: rows, prompt tokens, new tokens
ADAPTER = {"batch_size": 1, "max_length": 16, "length_bucket": 16}  # one batch shape: one compilation
SETTINGS = hypothesis.settings(
  max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
  """A tiny random Qwen2-MoE checkpoint with a byte-level BPE tokenizer."""
  path = tmp_path_factory.mktemp("tiny_validation_model")
  texts = [p.read_text() for p in sorted(pathlib.Path(TASKS_DIR).iterdir()) if p.suffix in (".jsonl", ".txt")]
  tokenizer = build_tokenizer(path, texts, vocab_size=VOCAB)
  config = tiny_qwen2_moe_config(
    vocab_size=VOCAB,
    num_hidden_layers=2,
    num_experts_per_tok=TOP_K,
    max_position_embeddings=64,
    eos_token_id=tokenizer.eos_token_id,
    bos_token_id=tokenizer.bos_token_id,
  )
  build_hf_model(config, path, seed=5)
  return path


@pytest.fixture(scope="module")
def model(path):
  return moejax.load(path)


@pytest.fixture(scope="module")
def engine(path):
  """One engine for every Engine case (its jitted steps compile once per shape)."""
  return Engine(moejax.load(path, experts="host"), policy="lru", cache_slots=TOP_K)


@pytest.fixture(scope="module")
def lm(engine, path):
  return MoejaxLM(engine, transformers.AutoTokenizer.from_pretrained(path), **ADAPTER)


# ----------------------------------------------------------------------------
# Strategies: (arguments, name of the broken one or None)
# ----------------------------------------------------------------------------

PROMPT_FAULTS = [
  "vocab",
  "negative",
  "fraction",
  "bool",
  "str",
  "object",
  "ndim",
  "empty",
  "ragged",
  "mask_shape",
  "mask_value",
  "empty_row",
  "gap",
  "right",
]


@st.composite
def prompts(draw, right_padding: bool):
  """(input_ids, attention_mask, broken) for a `[B, T]` batch; with right_padding, right-padded rows are good."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  lengths = rng.integers(1, T + 1, B)
  real = np.arange(T)[None] >= T - lengths[:, None]  # left padded
  if right_padding and draw(st.booleans()):
    real = real[:, ::-1]
  ids = rng.integers(0, VOCAB, (B, T))
  mask = draw(st.sampled_from(["int", "bool", "float", "none"]))
  mask = None if mask == "none" and real.all() else real.astype({"int": np.int64, "bool": bool}.get(mask, np.float32))
  fault = draw(st.one_of(st.none(), st.sampled_from(PROMPT_FAULTS)))
  r = int(rng.integers(B))
  last = int(np.flatnonzero(real[r])[-1])
  ids = ids.astype(np.int64)
  if fault is None:
    ids = draw(st.sampled_from([ids, ids.astype(np.int32), ids.astype(np.float64), ids.tolist()]))
  elif fault in ("vocab", "negative"):  # at a real or a padding position
    at = (r, draw(st.sampled_from([last, int(rng.integers(T))])))
    ids[at] = draw(st.integers(VOCAB, 2**40) if fault == "vocab" else st.integers(-(2**40), -1))
  elif fault == "fraction":
    ids = ids.astype(np.float64)
    ids[r, last] += 0.5
  elif fault in ("bool", "str", "object"):
    ids = ids.astype({"bool": bool, "str": str, "object": object}[fault])
    if fault == "object":
      ids[r, last] = None
  elif fault == "ndim":
    ids, mask = draw(st.sampled_from([(ids[0], None), (ids[None], None), (np.int64(5), None)]))
  elif fault == "empty":
    ids, mask = draw(st.sampled_from([(ids[:, :0], None), (ids[:0], None)]))
  elif fault == "ragged":
    ids = [row.tolist()[: T - i] for i, row in enumerate(ids)]
  else:
    mask = real.astype(np.int64)
    if fault == "mask_shape":
      mask = draw(st.sampled_from([mask[:, 1:], mask[:1], mask[..., None]]))
    elif fault == "mask_value":
      mask = mask.astype(np.float32)
      mask[r, last] = draw(st.sampled_from([2, -1, 0.5]))
    elif fault == "empty_row":
      mask[r] = 0
    elif fault == "gap":
      mask[r] = 0
      mask[r, [0, T - 1]] = 1
    elif fault == "right":
      mask[r] = np.arange(T) < int(rng.integers(1, T))
    if fault == "right" and right_padding:
      fault = None
  name = {
    None: None,
    "mask_shape": "attention_mask",
    "mask_value": "attention_mask",
    "empty_row": "attention_mask",
    "gap": "attention_mask",
    "right": "attention_mask",
  }.get(fault, "input_ids")
  return ids, mask, name


@st.composite
def sampling_args(draw):
  """(temperature, top_p, broken): good ones from two settings (each setting compiles the decode loop once)."""
  fault = draw(st.one_of(st.none(), st.sampled_from(["temperature", "top_p"])))
  temperature, top_p = draw(st.sampled_from([(0.0, 1.0), (0.8, 0.9)]))
  if fault == "temperature":
    temperature = draw(
      st.one_of(st.floats(max_value=-1e-6), st.sampled_from([float("nan"), float("inf"), "hot", None]))
    )
  elif fault == "top_p":
    top_p = draw(
      st.one_of(
        st.floats(max_value=0.0),
        st.floats(min_value=1.0, exclude_min=True),
        st.sampled_from([float("nan"), "all", True]),
      )
    )
  return temperature, top_p, fault


def bad_count():
  return st.one_of(st.integers(max_value=-1), st.sampled_from([2.0, 2.5, "3", True, None, np.array([3])]))


@st.composite
def forced_args(draw, n: int, faults: bool):
  """(forced_tokens, forced_mask, broken) for `[B, n]` continuations (n >= 2 for a broken one)."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  fault = None
  if faults:
    fault = draw(
      st.one_of(st.none(), st.sampled_from(["tokens_shape", "tokens_vocab", "mask_alone", "mask_shape", "mask_order"]))
    )
  if fault is None and draw(st.booleans()):
    return None, None, None
  forced = rng.integers(0, VOCAB, (B, n))
  mask = (np.arange(n)[None] < rng.integers(0, n + 1, (B, 1))).astype(np.int64)  # right padded
  if fault is None:
    return forced, draw(st.sampled_from([mask, None])), None
  if fault == "tokens_shape":
    return draw(st.sampled_from([forced[:, :-1], forced[:1], forced[0], forced[..., None]])), None, "forced_tokens"
  if fault == "tokens_vocab":
    forced[0, 0] = draw(st.sampled_from([VOCAB, -1, 10**9]))
    return forced, None, "forced_tokens"
  if fault == "mask_alone":
    return None, mask, "forced_mask"
  if fault == "mask_shape":
    return forced, mask[:, :-1], "forced_mask"
  mask[0] = 0
  mask[0, -1] = 1
  return forced, mask, "forced_mask"


def check(call, broken, expect):
  """Runs call(); with a broken argument it must raise ValueError naming it, else `expect(result)` checks it."""
  if broken is None:
    expect(call())
  else:
    with pytest.raises(ValueError, match=broken):
      call()


def same_prompt(out, ids):
  np.testing.assert_array_equal(np.asarray(out)[:, :T], np.asarray(ids, np.float64).astype(np.int32))


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


@SETTINGS
@hypothesis.given(prompt=prompts(right_padding=True))
def test_model_forward(model, prompt):
  ids, mask, broken = prompt

  def expect(logits):
    assert logits.shape == (B, T, VOCAB) and np.isfinite(np.asarray(logits)).all()

  check(lambda: model.forward(ids, mask), broken, expect)


@SETTINGS
@hypothesis.given(prompt=prompts(right_padding=False), n=st.one_of(st.integers(0, 4), bad_count()))
def test_model_generate(model, prompt, n):
  ids, mask, broken = prompt
  good_n = isinstance(n, int) and not isinstance(n, bool) and n >= 0
  if not good_n:
    ids, mask, broken = np.ones((B, T), int), None, "max_new_tokens"

  def expect(tokens):
    assert tokens.shape == (B, T + n) and ((0 <= tokens[:, T:]) & (tokens[:, T:] < VOCAB)).all()
    same_prompt(tokens, ids)

  check(lambda: model.generate(ids, n, mask), broken, expect)


def test_model_forward_accepts_right_padding(model):
  """Right- and left-padded rows give the unpadded row's logits at their real positions."""
  row = np.random.default_rng(0).integers(0, VOCAB, 4)
  alone = np.asarray(model.forward(row[None]))[0]
  ids = np.stack([np.r_[row, 7, 7], np.r_[0, 0, row]])
  mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
  logits = np.asarray(model.forward(ids, mask))
  np.testing.assert_allclose(logits[0, :4], alone, atol=1e-5)
  np.testing.assert_allclose(logits[1, 2:], alone, atol=1e-5)
  # Whole floats are token ids too.
  np.testing.assert_array_equal(np.asarray(model.forward(row[None].astype(np.float32)))[0], alone)


# ----------------------------------------------------------------------------
# Engine (and the two cases of issue 16)
# ----------------------------------------------------------------------------


def test_engine_refuses_ids_outside_the_vocabulary(engine):
  with pytest.raises(ValueError, match=r"input_ids.*vocabulary \[0, 320\)"):
    engine.generate(np.array([[1, 99999]]), 2)


def test_engine_refuses_an_empty_prompt(engine):
  with pytest.raises(ValueError, match="input_ids has shape"):
    engine.generate(np.zeros((1, 0), np.int64), 2)


@SETTINGS
@hypothesis.given(data=st.data())
def test_engine_generate(engine, data):
  ids, mask, broken = data.draw(prompts(right_padding=False))
  n = data.draw(st.sampled_from([0, 1, N]))
  # At most one broken argument: the prompt's, else a sampling option's, else the forced tokens', else n's.
  temperature, top_p, bad = data.draw(sampling_args()) if broken is None else (0.0, 1.0, None)
  broken = broken or bad
  forced, forced_mask, bad = data.draw(forced_args(n, faults=broken is None and n == N))
  broken = broken or bad
  if broken is None and data.draw(st.booleans()):
    n, broken, forced, forced_mask = data.draw(bad_count()), "max_new_tokens", None, None

  def expect(result):
    assert result.tokens.shape == (B, T + n) and result.logprobs.shape == result.greedy.shape == (B, n)
    same_prompt(result.tokens, ids)
    if forced is not None:
      real = np.ones(forced.shape, bool) if forced_mask is None else forced_mask.astype(bool)
      np.testing.assert_array_equal(result.tokens[:, T:][real], forced[real])

  check(
    lambda: engine.generate(
      ids, n, mask, forced_tokens=forced, forced_mask=forced_mask, temperature=temperature, top_p=top_p
    ),
    broken,
    expect,
  )


@SETTINGS
@hypothesis.given(prompt=prompts(right_padding=True))
def test_engine_score(engine, prompt):
  ids, mask, broken = prompt

  def expect(result):
    logp, greedy = result
    assert logp.shape == greedy.shape == (B, T - 1) and greedy.dtype == bool

  check(lambda: engine.score(ids, mask), broken, expect)


def test_engine_score_right_padding_equals_left_padding(engine):
  """Right padding is accepted by scoring passes: the real positions score as with left padding."""
  row = np.random.default_rng(1).integers(0, VOCAB, 4)
  left, _ = engine.score(np.r_[0, 0, row][None], [[0, 0, 1, 1, 1, 1]])
  right, _ = engine.score(np.r_[row, 0, 0][None], [[1, 1, 1, 1, 0, 0]])
  np.testing.assert_allclose(right[0, :3], left[0, 2:], atol=1e-5)


def test_sampling_checks_its_options():
  logits = np.zeros((1, 5), np.float32)
  with pytest.raises(ValueError, match="temperature"):
    sampling.sample(logits, jax.random.PRNGKey(0), temperature=-0.5)
  with pytest.raises(ValueError, match="top_p"):
    sampling.sample(logits, jax.random.PRNGKey(0), temperature=1.0, top_p=1.5)


# ----------------------------------------------------------------------------
# Scoring helpers and the lm-eval adapter
# ----------------------------------------------------------------------------

PAIR_FAULTS = ["empty_context", "vocab", "negative", "fraction", "str", "not_a_pair", "nested"]


@st.composite
def token_pairs(draw):
  """(pairs, broken): 1-3 (context, continuation) token lists, or one of them broken."""
  seq = lambda lo, hi: st.lists(st.integers(0, VOCAB - 1), min_size=lo, max_size=hi)
  pairs = draw(st.lists(st.tuples(seq(1, 6), seq(0, 4)), min_size=1, max_size=3))
  fault = draw(st.one_of(st.none(), st.sampled_from(PAIR_FAULTS)))
  if fault is None:
    return pairs, None
  i = draw(st.integers(0, len(pairs) - 1))
  ctx, cont = list(pairs[i][0]), list(pairs[i][1])
  if fault == "empty_context":
    ctx = []
  elif fault == "not_a_pair":
    pairs[i] = draw(st.sampled_from([(ctx,), "ab", 5]))
    return pairs, "pairs"
  elif fault == "nested":
    ctx = [ctx]
  else:
    ctx[-1] = {"vocab": VOCAB, "negative": -3, "fraction": 1.5, "str": "a"}[fault]
  pairs[i] = (ctx, cont)
  return pairs, "pairs"


@SETTINGS
@hypothesis.given(
  case=token_pairs(),
  mode=st.sampled_from(["decode", "prefill"]),
  option=st.sampled_from([None, "batch_size", "max_length", "length_bucket", "mode"]),
)
def test_score_pairs(engine, case, mode, option):
  pairs, broken = case
  kwargs = {**ADAPTER, "mode": mode}
  if broken is None and option is not None:
    kwargs[option], broken = (0 if option != "mode" else "beam"), option

  def expect(results):
    assert len(results) == len(pairs)
    for (_, cont), (logp, greedy) in zip(pairs, results):
      assert isinstance(greedy, bool) and np.isfinite(logp) and logp <= 1e-6
      if not cont:
        assert (logp, greedy) == (0.0, True)

  check(lambda: scoring.score_pairs(engine, pairs, **kwargs), broken, expect)


TEXT = st.text(alphabet="abcde opq,.\n", max_size=24)


def requests(kind, args):
  return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@SETTINGS
@hypothesis.given(
  args=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
  bad=st.sampled_from([None, 0, 1]),
  value=st.sampled_from([None, 3, b"bytes", ["list"]]),
)
def test_adapter_loglikelihood(lm, args, bad, value):
  broken = None
  if bad is not None:
    args[0] = tuple(value if j == bad else a for j, a in enumerate(args[0]))
    broken = "requests"

  def expect(results):
    assert len(results) == len(args)
    assert all(np.isfinite(logp) and logp <= 1e-6 and isinstance(greedy, bool) for logp, greedy in results)

  check(lambda: lm.loglikelihood(requests("loglikelihood", args)), broken, expect)


@st.composite
def gen_kwargs(draw):
  """(gen_kwargs, broken): lm-eval's greedy defaults, or one key made unsupported."""
  kwargs = {"until": draw(st.sampled_from([["\n"], ".", [], ["\x00never"]])), "max_gen_toks": draw(st.integers(0, 3))}
  kwargs.update(
    draw(
      st.sampled_from(
        [
          {},
          {"do_sample": False},
          {"do_sample": False, "temperature": 0.0},
          {"temperature": 0.0},
          {"do_sample": False, "temperature": 0.7},
        ]
      )
    )
  )
  fault = draw(
    st.one_of(st.none(), st.sampled_from(["max_gen_toks", "do_sample", "temperature", "num_beams", "until"]))
  )
  if fault == "max_gen_toks":
    kwargs["max_gen_toks"] = draw(st.one_of(bad_count(), st.integers(ADAPTER["max_length"], 100)))
  elif fault == "do_sample":
    kwargs["do_sample"] = True
  elif fault == "temperature":
    kwargs.pop("do_sample", None)
    kwargs["temperature"] = draw(st.sampled_from([0.5, -1.0, "warm"]))
  elif fault == "num_beams":
    kwargs["num_beams"] = 4
  elif fault == "until":
    kwargs["until"] = draw(st.sampled_from([5, [".", 3]]))
  return kwargs, fault


@SETTINGS
@hypothesis.given(contexts=st.lists(TEXT, min_size=1, max_size=3), case=gen_kwargs())
def test_adapter_generate_until(lm, contexts, case):
  kwargs, broken = case

  def expect(texts):
    assert len(texts) == len(contexts) and all(isinstance(t, str) for t in texts)

  check(lambda: lm.generate_until(requests("generate_until", [(c, dict(kwargs)) for c in contexts])), broken, expect)


# ----------------------------------------------------------------------------
# The checks themselves, on hand-worked cases
# ----------------------------------------------------------------------------


def test_prompt_batch_returns_int32_ids_and_bool_mask():
  ids, valid = validation.prompt_batch([[0, 1, 2], [3.0, 3, 3]], [[0, 1, 1], [0, 0, True]], vocab_size=4)
  np.testing.assert_array_equal(ids, [[0, 1, 2], [3, 3, 3]])
  np.testing.assert_array_equal(valid, [[False, True, True], [False, False, True]])
  assert ids.dtype == np.int32 and valid.dtype == bool


def test_padding_ids_outside_the_vocabulary_would_poison_the_row(model):
  """Why padding ids are checked too: unchecked, an id past the table turns the row's real logits into NaN."""
  ids, mask = np.array([[VOCAB, 1, 2], [0, 1, 2]]), np.array([[0, 1, 1], [0, 1, 1]])
  with pytest.raises(ValueError, match=rf"input_ids\[0, 0\] = {VOCAB} is outside the vocabulary"):
    model.forward(ids, mask)
  forward, _ = model_lib._programs()
  logits, _ = forward(
    model.graphdef,
    model.state,
    model.experts_on_device(),
    ids,
    model_lib.prompt_positions(mask),
    mask.astype(bool),
    model.init_caches(2, 3),
    0,
  )
  assert np.isnan(np.asarray(logits)[0, 1:]).all() and np.isfinite(np.asarray(logits)[1, 1:]).all()


def test_messages_name_the_value_and_the_fix():
  with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = 99999 is outside the vocabulary \[0, 10\)"):
    validation.prompt_batch([[1, 99999]], vocab_size=10)
  with pytest.raises(ValueError, match=r"row 1 = \[1 1 0\] is right padded.*padding_side"):
    validation.prompt_batch([[1, 2, 3], [1, 2, 3]], [[1, 1, 1], [1, 1, 0]], vocab_size=10)
  with pytest.raises(ValueError, match=r"forced_mask row 0 = \[0 1\] has a real token after padding"):
    validation.forced_batch([[1, 2]], [[0, 1]], batch=1, max_new_tokens=2, vocab_size=10)
  assert validation.generation_options(np.int64(3), np.float32(0.5), 1) == (3, 0.5, 1.0)
  assert validation.forced_batch(None, None, batch=1, max_new_tokens=2, vocab_size=10) == (None, None)
