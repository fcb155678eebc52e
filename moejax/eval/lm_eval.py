"""The lm-evaluation-harness model "moejax": lm-eval tasks scored through the Engine.

Importing this module registers the model with lm-eval, so that

    lm_eval.simple_evaluate(model="moejax", model_args={"pretrained": DIR, "policy": "smoe", "alpha": 0.2,
                                                       "cache_slots": 16}, tasks=[...])

works; from the shell, `python -m moejax.eval` is lm-eval's CLI with the model
registered and the local tasks (`moejax/eval/tasks`) on the include path.

Scoring sees the policy where generation would: a loglikelihood request
prefills its context and feeds the continuation token by token through the
decode path (`Engine.generate(context, len(cont), forced_tokens=cont)`), so
substitution and the expert cache act on exactly the tokens they would act on
while generating it; `loglikelihood_rolling` scores lm-eval's rolling windows
the same way. With `policy_in_prefill=True` the policy also schedules the
prefill. `generate_until` decodes greedily in batches and stops each batch once
every row has produced a stop string, EOS or `max_gen_toks` tokens; its
gen_kwargs are `GEN_KWARGS` (others raise rather than being ignored).

The engine's cache state carries over from request to request (as in a serving
process); `reset_cache=True` empties it before every batch instead, making a
request's score independent of the requests before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from moejax import validation
from moejax.engine import Engine, costs
from moejax.eval import scoring
from moejax.eval.tokenizer import load_tokenizer, prefix_token_id
from moejax.scheduling.similarity import load_similarity

# model_args understood by `MoejaxLM.from_options`, with the type each is parsed to.
ENGINE_OPTIONS = {
  "policy": str,
  "alpha": float,
  "cache_slots": int,
  "cache_bytes": int,
  "cache_fraction": float,
  "window": int,
  "substitute_weight": str,
  "cache_prior_strength": float,
  "policy_in_prefill": bool,
  "profile": bool,
  "record_routing": bool,
  "costs": str,
}
ADAPTER_OPTIONS = {
  "pretrained": str,
  "tokenizer": str,
  "dtype": str,
  "similarity": str,
  "batch_size": int,
  "max_length": int,
  "max_gen_toks": int,
  "add_bos_token": bool,
  "length_bucket": int,
  "reset_cache": bool,
  # Passed by lm-eval to every model; JAX places arrays on its default device.
  "device": str,
  "max_batch_size": int,
}
# gen_kwargs `generate_until` understands. Decoding is greedy: sampling (do_sample, or a temperature > 0 without
# do_sample: false) is refused; top_p / top_k only shape sampling, so greedy decoding ignores them (as transformers).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")


def parse_option(name: str, value, kind: type):
  """One model_arg from a string (or an already typed value); "none" and None give None."""
  if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
    return None
  if kind is bool:
    if isinstance(value, str):
      text = value.strip().lower()
      if text not in ("true", "false", "1", "0"):
        raise ValueError(f"model_arg {name}={value!r} is not a bool; use true or false.")
      return text in ("true", "1")
    return bool(value)
  if kind is int and isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
    raise ValueError(f"model_arg {name}={value!r} is not an integer.")
  return kind(value)


def parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
  """model_args (strings or values) -> typed values; unknown names raise, naming the known ones."""
  known = {**ENGINE_OPTIONS, **ADAPTER_OPTIONS}
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise ValueError(f"Unknown moejax model_args {unknown}; known: {sorted(known)}.")
  return {name: parse_option(name, value, known[name]) for name, value in options.items()}


@register_model("moejax")
class MoejaxLM(LM):
  """An lm-eval `LM` over a moejax `Engine` and a HF tokenizer.

  Args:
    engine: the `Engine` (policy, alpha, cache) that scores and generates.
    tokenizer: a `transformers` tokenizer of the model.
    batch_size: requests per engine call.
    max_length: longest model input (default: the model's max positions).
    max_gen_toks: generation budget when a request gives none.
    add_bos_token: prepend BOS (EOS if the tokenizer has none) to every context.
    length_bucket: pad lengths to multiples of this (fewer compilations).
    reset_cache: empty the engine's cache before every batch.

  Build it from strings with `MoejaxLM.from_options` (what lm-eval calls).
  `run_stats` accumulates the engine's statistics over every request;
  `stats()` summarises them.
  """

  def __init__(
    self,
    engine: Engine,
    tokenizer,
    *,
    batch_size: int = 1,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    add_bos_token: bool = False,
    length_bucket: int = 32,
    reset_cache: bool = False,
  ):
    super().__init__()
    self.engine = engine
    self.tokenizer = tokenizer
    self.batch_size = validation.count(batch_size, name="batch_size", minimum=1)
    self.max_length = validation.count(
      max_length or engine.config.max_position_embeddings, name="max_length", minimum=1
    )
    self.max_gen_toks = validation.count(max_gen_toks, name="max_gen_toks")
    self.add_bos_token = add_bos_token
    self.length_bucket = validation.count(length_bucket, name="length_bucket", minimum=1)
    self.reset_cache = reset_cache
    self.prefix_token = prefix_token_id(tokenizer)
    self.run_stats = engine.new_run_stats()

  @classmethod
  def from_options(cls, **options) -> MoejaxLM:
    """Loads `pretrained` with routed experts on the host and builds the Engine from model_args.

    Options are the Engine's (`ENGINE_OPTIONS`) and the adapter's
    (`ADAPTER_OPTIONS`); `similarity` is a `.npz` from `save_similarity`;
    values may be strings ("0.2", "true", "none").
    """
    opts = parse_options(options)
    if "pretrained" not in opts:
      raise ValueError("model_args needs pretrained=DIR (a HuggingFace checkpoint directory).")
    engine_kw = {k: v for k, v in opts.items() if k in ENGINE_OPTIONS and v is not None}
    engine_kw.setdefault("costs", costs.DEFAULT_FIXED)  # repeatable scores; costs=calibrate measures this machine
    if opts.get("similarity"):
      engine_kw["similarity"] = load_similarity(opts["similarity"])[0]
    engine = Engine.from_pretrained(opts["pretrained"], dtype=opts.get("dtype"), **engine_kw)
    adapter_kw = {
      k: opts[k]
      for k in ("batch_size", "max_length", "max_gen_toks", "add_bos_token", "length_bucket", "reset_cache")
      if opts.get(k) is not None
    }
    return cls(engine, load_tokenizer(opts["pretrained"], opts.get("tokenizer")), **adapter_kw)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None) -> MoejaxLM:
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls.from_options(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None) -> MoejaxLM:
    return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string), additional_config)

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def stats(self) -> dict[str, Any]:
    """The engine's statistics over every request so far (`RunStats.summary`)."""
    return self.run_stats.summary()

  # --------------------------------------------------------------------------
  # Tokens
  # --------------------------------------------------------------------------

  def _encode(self, text: str, *, context: bool) -> list[int]:
    ids = self.tokenizer.encode(text, add_special_tokens=False)
    return [self.prefix_token] + ids if context and self.add_bos_token else ids

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context, continuation) tokens; the context's trailing spaces move to the continuation (as lm-eval's HF model).

    A context without tokens (empty, or spaces only) is conditioned on the prefix token.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = self._encode(context, context=True)
    whole = self._encode(context + continuation, context=True)
    return ctx or [self.prefix_token], whole[len(ctx) :]

  def _score(self, pairs, desc: str) -> list[tuple[float, bool]]:
    with tqdm(total=len(pairs), desc=desc, disable=not pairs) as bar:
      return scoring.score_pairs(
        self.engine,
        pairs,
        max_length=self.max_length,
        batch_size=self.batch_size,
        length_bucket=self.length_bucket,
        reset_cache=self.reset_cache,
        run_stats=self.run_stats,
        progress=bar,
      )

  # --------------------------------------------------------------------------
  # lm-eval requests
  # --------------------------------------------------------------------------

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) per request, through the decode path."""
    pairs = [self._encode_pair(*_request_args(req, i, (str, str))) for i, req in enumerate(requests)]
    results = self._score(pairs, "moejax loglikelihood")
    for req, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, result)
    return results

  def loglikelihood_rolling(self, requests) -> list[float]:
    """log p(text) per request, over lm-eval's rolling windows of max_length tokens."""
    pairs, owner = [], []
    for i, req in enumerate(requests):
      (text,) = _request_args(req, i, (str,))
      windows = scoring.rolling_windows(
        self._encode(text, context=False), self.prefix_token, self.max_length, context=1
      )
      pairs += windows
      owner += [i] * len(windows)
    totals = np.zeros(len(requests))
    for i, (logp, _) in zip(owner, self._score(pairs, "moejax loglikelihood_rolling")):
      totals[i] += logp
    results = [float(t) for t in totals]
    for req, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, result)
    return results

  def generate_until(self, requests) -> list[str]:
    """Greedy continuations, cut at the first stop string (`until`, plus EOS), at most `max_gen_toks` tokens."""
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(_request_args(req, i, (str, dict))[1].items())), []).append(i)
    with tqdm(total=len(requests), desc="moejax generate_until", disable=not requests) as bar:
      for indices in groups.values():
        until, max_new = self._generation_settings(requests[indices[0]].args[1])
        contexts = [self._encode(requests[i].args[0], context=True) or [self.prefix_token] for i in indices]
        for batch in scoring.length_batches([(len(c),) for c in contexts], self.batch_size):
          texts = self._generate([contexts[j] for j in batch], until, max_new)
          for j, text in zip(batch, texts):
            req = requests[indices[j]]
            results[indices[j]] = text
            self.cache_hook.add_partial("generate_until", req.args, text)
          bar.update(len(batch))
    return results

  def _generation_settings(self, kwargs: Mapping[str, Any]) -> tuple[list[str], int]:
    """(stop strings, token budget) of a request's gen_kwargs (`GEN_KWARGS`); only greedy decoding is supported."""
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
      raise ValueError(f"gen_kwargs {unknown} are not supported by moejax's generate_until; known: {GEN_KWARGS}.")
    temperature, _ = validation.sampling_options(kwargs.get("temperature", 0.0), 1.0)
    do_sample = kwargs.get("do_sample")
    if do_sample or (do_sample is None and temperature > 0):
      raise ValueError(
        f"gen_kwargs ask for sampling (do_sample={do_sample}, temperature={temperature}); moejax's "
        "generate_until decodes greedily: set do_sample: false in the task's gen_kwargs."
      )
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
      raise ValueError(f"gen_kwargs until={until!r}; give a stop string or a list of them.")
    until = list(until)
    if self.tokenizer.eos_token is not None:
      until.append(self.tokenizer.eos_token)
    max_new = validation.count(kwargs.get("max_gen_toks", self.max_gen_toks), name="max_gen_toks")
    if max_new >= self.max_length:
      raise ValueError(f"max_gen_toks={max_new} leaves no room for a context within max_length={self.max_length}.")
    return until, max_new

  def _generate(self, contexts: list[list[int]], until: list[str], max_new: int) -> list[str]:
    """One batch: greedy decode until every row has a stop string; returns the texts cut before it."""
    if self.reset_cache:
      self.engine.reset()
    contexts = [c[-(self.max_length - max_new) :] for c in contexts]
    t = scoring.round_up(max(map(len, contexts)), self.length_bucket)
    ids, mask = scoring.pad_rows(contexts, t, left=True)

    def done(tokens: np.ndarray) -> bool:
      return all(any(s in self.tokenizer.decode(row) for s in until) for row in tokens)

    out = self.engine.generate(
      ids,
      max_new,
      mask,
      stop=done,
      run_stats=self.run_stats,
      cache_length=scoring.round_up(t + max_new, self.length_bucket),
    )
    texts = []
    for row in out.tokens[:, t:]:
      text = self.tokenizer.decode(row, skip_special_tokens=False)
      for s in until:
        text = text.split(s)[0]
      texts.append(text)
    return texts


def _request_args(request, index: int, kinds: tuple[type, ...]) -> tuple:
  """An lm-eval request's `args`, checked against the types its request kind carries."""
  args = request.args
  if not isinstance(args, tuple) or len(args) != len(kinds) or not all(map(isinstance, args, kinds)):
    got = tuple(type(a).__name__ for a in args) if isinstance(args, tuple) else type(args).__name__
    want = tuple(k.__name__ for k in kinds)
    raise ValueError(
      f"requests[{index}].args must be of types {want}, got {got}; check the task's doc_to_text, "
      "doc_to_target and gen_kwargs."
    )
  return args
