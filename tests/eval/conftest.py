"""One tiny random Qwen2-MoE checkpoint with a tiny byte-level BPE tokenizer, shared by the eval tests."""

import pathlib

import pytest
import tokenizers
import transformers

import moejax
from moejax.eval.tasks import TASKS_DIR
from tests.models.hf_utils import build_hf_model, tiny_qwen2_moe_config

VOCAB = 320
EOS = "<|endoftext|>"


def build_tokenizer(path, texts, vocab_size: int = VOCAB) -> transformers.PreTrainedTokenizerFast:
  """Trains a byte-level BPE on `texts` and saves it to `path` as a `PreTrainedTokenizerFast` (EOS = BOS)."""
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, eos_token=EOS, bos_token=EOS)
  fast.save_pretrained(path)
  return fast


@pytest.fixture(scope="session")
def eval_path(tmp_path_factory):
  """Checkpoint directory with config, weights and tokenizer files."""
  path = tmp_path_factory.mktemp("tiny_eval_model")
  texts = [p.read_text() for p in sorted(pathlib.Path(TASKS_DIR).iterdir()) if p.suffix in (".jsonl", ".txt")]
  tokenizer = build_tokenizer(path, texts)
  config = tiny_qwen2_moe_config(
    vocab_size=VOCAB,
    num_hidden_layers=2,
    max_position_embeddings=64,
    eos_token_id=tokenizer.eos_token_id,
    bos_token_id=tokenizer.bos_token_id,
  )
  build_hf_model(config, path, seed=3)
  return path


@pytest.fixture(scope="session")
def tokenizer(eval_path):
  return transformers.AutoTokenizer.from_pretrained(eval_path)


@pytest.fixture(scope="session")
def resident_model(eval_path):
  return moejax.load(eval_path)


@pytest.fixture(scope="session")
def host_model(eval_path):
  return moejax.load(eval_path, experts="host")
