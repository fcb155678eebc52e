"""Tests of moejax.scheduling.policies."""

import dataclasses

import pytest

from moejax.scheduling import policies

NAMES = (
  "resident",
  "cpu",
  "static",
  "layerwise",
  "lru",
  "lfu",
  "mrs",
  "cache_prior",
  "buddy",
  "smoe",
  "+ce",
  "+cr",
  "+pre",
  "+ba",
)


def components(spec):
  return dataclasses.replace(spec, name="")


def test_registry():
  assert set(policies.POLICIES) == set(NAMES)
  for name in NAMES:
    assert policies.get_policy(name).name == name
  assert policies.get_policy("+CE") == policies.get_policy("+ce")
  with pytest.raises(TypeError):
    policies.POLICIES["mine"] = policies.get_policy("lru")


def test_unknown_policy_lists_names():
  with pytest.raises(ValueError, match=r"'smoe'.*'\+ba'"):
    policies.get_policy("smoe2")


def test_ablation_is_cumulative_and_ends_at_smoe():
  steps = [policies.get_policy(n) for n in policies.ABLATION]
  cpu, ce, cr, pre, ba = steps
  assert cpu.eviction is None and cpu.cpu_compute == "always"
  assert ce.eviction == "score" and ce.cpu_compute == "never"
  assert components(cr) == components(dataclasses.replace(ce, substitution="score"))
  assert components(pre) == components(dataclasses.replace(cr, prefetch="provisional"))
  assert components(ba) == components(dataclasses.replace(pre, balance=True, cpu_compute="balance"))
  assert components(ba) == components(policies.get_policy("smoe"))


def test_baselines():
  get = policies.get_policy
  assert not get("resident").cache
  assert get("static").static and get("layerwise").layerwise
  assert get("lfu").eviction == "lfu" and get("lfu").prefetch == "activation"
  assert get("mrs").eviction == "mrs" and get("mrs").balance
  assert get("cache_prior").cache_prior
  assert get("buddy").substitution == "buddy"


def test_switching_a_component():
  spec = dataclasses.replace(policies.get_policy("smoe"), name="smoe-gate", prefetch="gate", substitution="similarity")
  assert spec.prefetch == "gate" and spec.eviction == "score"
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.prefetch = None


@pytest.mark.parametrize(
  "changes,match",
  [
    (dict(eviction="random"), "eviction must be one of"),
    (dict(substitution="random"), "substitution must be one of"),
    (dict(prefetch="oracle"), "prefetch must be one of"),
    (dict(cpu_compute="sometimes"), "cpu_compute must be one of"),
    (dict(balance=False), "switch both together"),
    (dict(cache=False), "every other component must be off"),
    (dict(eviction=None), "no eviction policy"),
    (dict(static=True), "no dynamic cache"),
  ],
)
def test_invalid_combinations(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(policies.get_policy("smoe"), **changes)
