"""Hardware profiles: lookup, provenance of every number, sanity of values."""

import dataclasses

import pytest

from moejax.sim import PROFILES, HardwareProfile, get_profile
from moejax.sim.profiles import _NUMERIC_FIELDS

EXPECTED = {"rtx3080ti_12gb", "rtx4060ti_16gb", "a6000_48gb", "jetson_orin_agx", "h200"}


def test_expected_profiles_exist():
  assert EXPECTED <= set(PROFILES)
  for name in EXPECTED:
    assert get_profile(name).name == name


def test_unknown_profile_lists_names():
  with pytest.raises(ValueError) as err:
    get_profile("rtx9090")
  msg = str(err.value)
  assert "rtx9090" in msg
  for name in EXPECTED:
    assert name in msg


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_number_has_a_labelled_source(name):
  prof = get_profile(name)
  for field in _NUMERIC_FIELDS:
    src = prof.sources.get(field, "")
    assert src.split(":")[0] in ("vendor", "derived", "assumption"), (name, field, src)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_values_are_plausible(name):
  p = get_profile(name)
  assert p.link_bw < p.gpu_mem_bw  # the host link is the bottleneck offloading fights
  assert p.cpu_mem_bw < p.gpu_mem_bw
  assert p.gpu_flops > p.cpu_flops
  assert 4 * 1024**3 <= p.gpu_memory <= 200 * 1024**3


def test_paper_gpus_ordering():
  # Memory bandwidth: 3080 Ti (912) > A6000 (768) > 4060 Ti (288) GB/s.
  bw = {n: get_profile(n).gpu_mem_bw for n in ("rtx3080ti_12gb", "a6000_48gb", "rtx4060ti_16gb")}
  assert bw["rtx3080ti_12gb"] > bw["a6000_48gb"] > bw["rtx4060ti_16gb"]
  # The 4060 Ti is a PCIe 4.0 x8 card: half the host link of the x16 cards.
  assert get_profile("rtx4060ti_16gb").link_bw == pytest.approx(get_profile("a6000_48gb").link_bw / 2)
  assert get_profile("h200").link_bw == pytest.approx(2 * get_profile("a6000_48gb").link_bw)


def test_profile_is_frozen_and_validated():
  p = get_profile("h200")
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.gpu_mem_bw = 1.0
  with pytest.raises(ValueError, match="link_bw"):
    dataclasses.replace(p, link_bw=0.0)
  assert dataclasses.replace(p, link_latency_s=0.0, kernel_overhead_s=0.0).link_latency_s == 0.0
  d = p.to_dict()
  assert d["name"] == "h200" and set(_NUMERIC_FIELDS) <= set(d["sources"])
  assert isinstance(p, HardwareProfile)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_plan_cost_is_an_assumption_of_tens_of_microseconds(name):
  # A device-side plan (a few small kernels); the 2-core CPU measured ~230 us.
  p = get_profile(name)
  assert p.sources["plan_s"].startswith("assumption:")
  assert 10e-6 <= p.plan_s <= 100e-6
