"""Byte-level BPE tokenizer trained with `tokenizers`, saved in the HuggingFace format.

The saved directory (`tokenizer.json`, `tokenizer_config.json`) loads with
`transformers.AutoTokenizer.from_pretrained` as it is. One special token,
`<|endoftext|>`, separates documents and serves as BOS, EOS and padding.
"""

from __future__ import annotations

from collections.abc import Iterable

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE tokenizer of `vocab_size` tokens (the 256 bytes, merges and EOS).

  Args:
    texts: training documents (the held-out split must not be among them).
    vocab_size: total vocabulary size, special token included.

  Returns:
    A `PreTrainedTokenizerFast` with `eos_token = bos_token = pad_token = EOS`.
  """
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    eos_token=EOS,
    bos_token=EOS,
    pad_token=EOS,
    unk_token=None,
    clean_up_tokenization_spaces=False,
  )
