"""The engine's tokens, log-probs and per-layer statistics on the shipped model equal recorded values.

The values in `data/engine_reference.json` were recorded by `tests/engine/reference_runs.py`; a change
that is meant to keep what the engine computes (a refactor) must keep them exactly.
"""

import json

import numpy as np
import pytest

import moejax
from moejax.scheduling import POLICIES
from tests.engine import reference_runs


@pytest.fixture(scope="module")
def model():
  return moejax.load(moejax.default_model_path(), dtype="float32", experts="host")


@pytest.fixture(scope="module")
def reference():
  with open(reference_runs.REFERENCE) as f:
    return json.load(f)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_engine_matches_recorded_reference(model, reference, policy):
  got = reference_runs.run(model, policy)
  for run in ("forced", "free"):
    want, have = reference[policy][run], got[run]
    np.testing.assert_array_equal(have["tokens"], want["tokens"], err_msg=f"{policy} {run}")
    np.testing.assert_allclose(have["logprobs"], want["logprobs"], atol=2e-5, err_msg=f"{policy} {run}")
    assert have["per_layer"] == want["per_layer"], f"{policy} {run}"
