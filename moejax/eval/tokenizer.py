"""Tokenizers for evaluation: the checkpoint's own, or one given by path."""

from __future__ import annotations

import os

import transformers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(pretrained: str | os.PathLike, tokenizer: str | os.PathLike | None = None):
  """`transformers.AutoTokenizer` of `tokenizer` if given, else of the checkpoint directory.

  Raises a ValueError naming the fix when the checkpoint has no tokenizer files.
  """
  if tokenizer is None:
    if not any(os.path.exists(os.path.join(pretrained, f)) for f in _TOKENIZER_FILES):
      raise ValueError(
        f"{pretrained} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); pass tokenizer=PATH, "
        "a directory (or hub name) holding the model's HF tokenizer."
      )
    tokenizer = pretrained
  return transformers.AutoTokenizer.from_pretrained(os.fspath(tokenizer))


def prefix_token_id(tokenizer) -> int:
  """The token that conditions text with no context: BOS, else EOS (as lm-eval does)."""
  for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
    if token_id is not None:
      return int(token_id)
  raise ValueError("The tokenizer has neither a BOS nor an EOS token; give it one to score text without context.")


def file_tokens(tokenizer, path: str | os.PathLike) -> list[int]:
  """The tokens of a UTF-8 text file, encoded as one stream without special tokens."""
  with open(path, encoding="utf-8") as f:
    return tokenizer.encode(f.read(), add_special_tokens=False)
