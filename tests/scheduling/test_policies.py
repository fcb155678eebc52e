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
  "smoe_release",
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


def test_release_preset_is_the_released_code():
  spec = policies.get_policy("smoe_release")
  assert (spec.substitution, spec.eviction, spec.prefetch, spec.cpu_compute) == (
    "release",
    "fifo",
    "layernorm",
    "greedy",
  )
  assert (spec.prefetch_limit, spec.prefetch_after_miss, spec.cache_scope, spec.fill) == (
    1,
    True,
    "global",
    "layer_order",
  )
  assert spec.alpha == 0.25 and not spec.renormalize and spec.split_costs


@pytest.mark.parametrize(
  "changes,match",
  [
    (dict(prefetch=None, prefetch_limit=1), "need a prefetch predictor"),
    (dict(prefetch_limit=0), "prefetch_limit must be >= 1"),
    (dict(cache_scope="pool"), "cache_scope must be one of"),
    (dict(fill="random"), "fill must be one of"),
    (dict(alpha=-0.1), "alpha must be >= 0"),
  ],
)
def test_release_fields_are_checked(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(policies.get_policy("smoe_release"), **changes)


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
