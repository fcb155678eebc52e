"""End to end on the shipped (trained) model: the policies move the statistics the way SPEC says."""

import numpy as np
import pytest
import transformers

import moejax
from moejax.engine import Engine
from moejax.scheduling import ABLATION

TEXT = (
  "Now the serpent was more subtle than any animal of the field which Yahweh God had made. "
  "He said to the woman, Has God really said, You shall not eat of any tree of the garden?"
)


@pytest.fixture(scope="module")
def setup():
  path = moejax.default_model_path()
  ids = np.asarray([transformers.AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"]], np.int32)
  return moejax.load(path, dtype="float32", experts="host"), ids[:, :12], ids[:, 12:]


def _run(model, prompt, continuation, policy, alpha):
  engine = Engine(model, policy=policy, alpha=alpha, cache_fraction=0.25)
  return engine.generate(prompt, continuation.shape[1], forced_tokens=continuation).stats


def test_smoe_beats_lru_on_hits_and_bytes(setup):
  model, prompt, cont = setup
  lru = _run(model, prompt, cont, "lru", 0.0)
  smoe = _run(model, prompt, cont, "smoe", 0.3)
  assert smoe["hit_ratio"] > lru["hit_ratio"]
  assert smoe["bytes_to_device"] < lru["bytes_to_device"]
  assert smoe["substitution_rate"] > 0


def test_cumulative_ablation_directions(setup):
  model, prompt, cont = setup
  s = {name: _run(model, prompt, cont, name, 0.3) for name in ABLATION}
  # cpu: nothing cached, every routed expert on the CPU.
  assert s["cpu"]["hit_ratio"] == 0 and s["cpu"]["bytes_to_device"] == 0
  # +ce: a score-evicted cache serves hits, misses are loaded (none on the CPU).
  assert s["+ce"]["hit_ratio"] > 0.2 and s["+ce"]["cpu_experts"] == 0
  # +cr: substitution raises the hit ratio and cuts the bytes copied.
  assert s["+cr"]["substitution_rate"] > 0
  assert s["+cr"]["hit_ratio"] > s["+ce"]["hit_ratio"]
  assert s["+cr"]["bytes_to_device"] < s["+ce"]["bytes_to_device"]
  # +pre: prefetched experts arrive before their layer runs; most turn out selected.
  assert s["+pre"]["prefetch_loads"] > 0 and s["+pre"]["prefetch_accuracy_selected"] > 0.5
  assert s["+pre"]["demand_loads"] < s["+cr"]["demand_loads"]
  # +ba: the two-pointer split computes some misses on the CPU instead of loading them.
  assert s["+ba"]["cpu_experts"] > 0
  assert s["+ba"]["demand_loads"] < s["+pre"]["demand_loads"]
