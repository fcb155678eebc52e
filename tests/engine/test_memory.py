"""A long decode keeps device memory flat: nothing grows per step or per call."""

import jax
import numpy as np

from moejax.engine import Engine


def _live_device_bytes() -> int:
  return sum(a.nbytes for a in jax.live_arrays() if a.sharding.memory_kind in (None, "device"))


def test_host_driven_decode_device_memory_is_flat(host_model):
  """With a stop callback the host drives every step: each step ends with the same live device bytes."""
  engine = Engine(host_model, policy="smoe", alpha=0.3, cache_slots=4)
  live = []
  step = engine._step

  def recording_step(*args, **kwargs):
    out = step(*args, **kwargs)
    live.append(_live_device_bytes())
    return out

  engine._step = recording_step
  engine.generate(np.arange(5)[None], 1000, stop=lambda tokens: False)
  assert len(live) == 1000  # prefill + 999 decode steps
  steady = np.asarray(live[20:])
  # After warm-up every step ends with exactly the same live device bytes.
  assert steady.max() == steady.min(), (steady.min(), steady.max())


def test_device_decode_memory_is_flat_across_calls(host_model):
  """The on-device decode loop: repeated long calls leave the same live device bytes behind."""
  engine = Engine(host_model, policy="smoe", alpha=0.3, cache_slots=4)
  live = []
  for _ in range(3):
    result = engine.generate(np.arange(5)[None], 500)
    assert result.stats["decode_steps"] == 499
    live.append(_live_device_bytes())
  assert live[1] == live[2], live
