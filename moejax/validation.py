"""Checks of what callers pass to the public entry points, on the host, before anything is compiled.

`Model.forward` / `Model.generate`, `Engine.generate` / `Engine.score`, the
scoring helpers and the lm-eval adapter run their arguments through these
functions. Each raises a `ValueError` that names the argument, the offending
value (or entry, or shape) and the fix, and returns the arguments in the form
the jitted code takes: int32 token ids, bool masks, Python numbers for static
arguments. They are numpy only and cost nothing per decode step.

Every token id, padding included, must lie in `[0, vocab_size)`. The
embedding lookup (`jnp.take`) gives NaN for an id outside the table (after
wrapping negative ones) without an error, and a NaN at a padding position
spreads to the real tokens of its row (a masked attention weight of 0 times
NaN is NaN): pad with 0 or the tokenizer's pad id.

Padding: the next token is predicted from the last column, so prompts to
continue must be left padded (`tokenizer.padding_side = "left"`). A forward
or scoring pass reads every position, so there the real tokens of a row may
sit anywhere as one contiguous run (left or right padding): rotary positions
count real tokens only (`moejax.models.model.prompt_positions`) and the
causal, padding-aware mask hides the rest, so each row's real positions get
the logits of the unpadded row. Padding between real tokens is refused (a
sliding-window layer would count the gap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _array(value, name: str) -> np.ndarray:
  """`value` as a numpy array; None or ragged nesting raise naming `name`."""
  if value is None:
    raise ValueError(f"{name} is None; pass an array.")
  try:
    return np.asarray(value)
  except (ValueError, TypeError) as e:  # ragged nested lists
    raise ValueError(f"{name} is not a rectangular array ({e}); pad every row to one length and pass a mask.") from None


def _scalar(value, name: str, kinds: str) -> np.ndarray:
  """A 0-d numeric array of one of the numpy dtype `kinds` (bools and strings refused)."""
  try:
    a = np.asarray(value)
  except (ValueError, TypeError):
    a = None
  if a is None or a.ndim != 0 or a.dtype.kind not in kinds:
    kind = "an integer (a Python or numpy int)" if kinds == "iu" else "a real number"
    raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
  return a


def count(value, *, name: str, minimum: int = 0) -> int:
  """An integer argument >= minimum (a token count, a batch size) as a Python int."""
  n = int(_scalar(value, name, "iu"))
  if n < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {n}.")
  return n


def sampling_options(temperature, top_p) -> tuple[float, float]:
  """(temperature, top_p) as Python floats: finite temperature >= 0 (0 is greedy), 0 < top_p <= 1."""
  temperature = float(_scalar(temperature, "temperature", "iuf"))
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be a finite number >= 0 (0 decodes greedily), got {temperature}.")
  top_p = float(_scalar(top_p, "top_p", "iuf"))
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p}.")
  return temperature, top_p


def generation_options(max_new_tokens, temperature=0.0, top_p=1.0) -> tuple[int, float, float]:
  """(max_new_tokens >= 0, temperature, top_p) of a generate call (see `sampling_options`)."""
  return (count(max_new_tokens, name="max_new_tokens"), *sampling_options(temperature, top_p))


def token_ids(values, *, name: str, vocab_size: int) -> np.ndarray:
  """Token ids of any shape as int32: integers (or floats holding whole numbers) in `[0, vocab_size)`.

  Bools, strings and objects are refused; `name` is the argument's name, for errors.
  """
  a = _array(values, name)
  if a.dtype.kind not in "iuf":
    raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}; pass the tokenizer's integer ids.")
  if a.dtype.kind == "f":
    whole = np.isfinite(a) & (a == np.round(a))
    if not whole.all():
      at = tuple(int(i) for i in np.argwhere(~whole)[0])
      raise ValueError(f"{name}{list(at)} = {a[at]} is not a whole number; token ids are integers.")
  bad = (a < 0) | (a >= vocab_size)
  if bad.any():
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
      f"{name}{list(at)} = {a[at]} is outside the vocabulary [0, {vocab_size}) ({int(bad.sum())} ids in all); "
      "encode text with this model's tokenizer, and pad with 0 or its pad token id."
    )
  return a.astype(np.int32)


def _mask(value, name: str, shape: tuple[int, ...], of: str) -> np.ndarray:
  """A 0/1 (or bool) mask of the given shape as bool."""
  m = _array(value, name)
  if m.shape != shape:
    raise ValueError(f"{name} has shape {m.shape} but {of} has shape {shape}; give one 0/1 entry per token.")
  if m.dtype.kind not in "biuf":
    raise ValueError(f"{name} must hold 0/1 (or bools), got dtype {m.dtype}.")
  binary = (m == 0) | (m == 1)
  if not binary.all():
    at = tuple(int(i) for i in np.argwhere(~binary)[0])
    raise ValueError(f"{name}{list(at)} = {m[at]}; a mask holds 1 for real tokens and 0 for padding.")
  return m.astype(bool)


def _row(mask_row: np.ndarray) -> str:
  """A mask row as "[0 1 1]" (the ends of a long one)."""
  bits = ["1" if v else "0" for v in mask_row]
  return "[" + " ".join(bits if len(bits) <= 32 else [*bits[:12], "...", *bits[-12:]]) + "]"


def prompt_batch(input_ids, attention_mask=None, *, vocab_size: int, right_padding: bool = False):
  """Checks a batch of token sequences and returns (ids `[B, T]` int32, valid `[B, T]` bool).

  Args:
    input_ids: `[B, T]` token ids, B >= 1 and T >= 1.
    attention_mask: `[B, T]` 1 (or True) for real tokens, 0 for padding;
      default: every token is real. Every row needs a real token.
    vocab_size: the model's vocabulary; every id (padding too) must lie in `[0, vocab_size)`.
    right_padding: accept rows whose real tokens end before the last column
      (forward and scoring passes); default: prompts to continue, which must be
      left padded. Either way a row's real tokens are one contiguous run.
  """
  ids = _array(input_ids, "input_ids")
  if ids.ndim != 2:
    fix = "add a batch axis (input_ids[None]) for one sequence" if ids.ndim == 1 else "pass [batch, tokens]"
    raise ValueError(f"input_ids must be [batch, tokens], got shape {ids.shape}; {fix}.")
  if 0 in ids.shape:
    raise ValueError(
      f"input_ids has shape {ids.shape}: a batch needs at least one row of at least one token "
      "(condition an empty prompt on a BOS/EOS token)."
    )
  valid = (
    np.ones(ids.shape, bool)
    if attention_mask is None
    else _mask(attention_mask, "attention_mask", ids.shape, of="input_ids")
  )
  empty = ~valid.any(axis=1)
  if empty.any():
    raise ValueError(
      f"attention_mask row {int(np.argmax(empty))} is all padding ({int(empty.sum())} rows in all); every row needs "
      "at least one real token: drop the row, or condition it on a BOS/EOS token."
    )
  starts = valid & ~np.pad(valid, ((0, 0), (1, 0)))[:, :-1]  # first token of each run of real tokens
  gaps = starts.sum(axis=1) > 1
  if gaps.any():
    r = int(np.argmax(gaps))
    raise ValueError(
      f"attention_mask row {r} = {_row(valid[r])} has padding between real tokens; a row's real tokens must be "
      "one contiguous run (pad on the left)."
    )
  if not right_padding and not valid[:, -1].all():
    r = int(np.argmax(~valid[:, -1]))
    raise ValueError(
      f"attention_mask row {r} = {_row(valid[r])} is right padded; a prompt to continue must end with its real "
      'tokens: pad on the left (tokenizer.padding_side = "left").'
    )
  return token_ids(ids, name="input_ids", vocab_size=vocab_size), valid


def forced_batch(forced_tokens, forced_mask, *, batch: int, max_new_tokens: int, vocab_size: int):
  """Checks teacher-forced continuations; returns (forced `[B, N]` int32 | None, mask `[B, N]` bool | None).

  Args:
    forced_tokens: None (sample), or `[batch, max_new_tokens]` token ids to
      feed instead of sampling.
    forced_mask: None (every forced token is real), or `[B, N]` 0/1 with each
      row's real tokens first (right padding of shorter continuations); needs
      forced_tokens. Every id (padding too) must lie in `[0, vocab_size)`.
  """
  if forced_tokens is None:
    if forced_mask is not None:
      raise ValueError("forced_mask was given without forced_tokens; pass forced_tokens [batch, max_new_tokens].")
    return None, None
  forced = _array(forced_tokens, "forced_tokens")
  if forced.shape != (batch, max_new_tokens):
    raise ValueError(
      f"forced_tokens must be [batch, max_new_tokens] = [{batch}, {max_new_tokens}], got shape {forced.shape}."
    )
  mask = None
  if forced_mask is not None:
    mask = _mask(forced_mask, "forced_mask", forced.shape, of="forced_tokens")
    gaps = (mask[:, 1:] & ~mask[:, :-1]).any(axis=1)
    if gaps.any():
      r = int(np.argmax(gaps))
      raise ValueError(
        f"forced_mask row {r} = {_row(mask[r])} has a real token after padding; each row's real tokens come "
        "first (right padding of a shorter continuation)."
      )
  return token_ids(forced, name="forced_tokens", vocab_size=vocab_size), mask


def token_pairs(pairs: Sequence[Any], *, vocab_size: int) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) token sequences as lists of ints; contexts non-empty, ids in `[0, vocab_size)`."""
  out = []
  for i, pair in enumerate(pairs):
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
      raise ValueError(f"pairs[{i}] = {pair!r} is not a (context tokens, continuation tokens) pair.")
    context, continuation = (
      token_ids(seq, name=f"pairs[{i}][{j}]", vocab_size=vocab_size) for j, seq in enumerate(pair)
    )
    if context.ndim != 1 or continuation.ndim != 1:
      raise ValueError(
        f"pairs[{i}] holds arrays of shapes {context.shape}, {continuation.shape}; give two flat "
        "sequences of token ids."
      )
    context, continuation = context.tolist(), continuation.tolist()
    if not context:
      raise ValueError(f"pairs[{i}] has an empty context; condition it on a BOS/EOS token instead.")
    out.append((context, continuation))
  return out
