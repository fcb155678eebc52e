"""A long decode keeps device memory flat: nothing grows per step."""

import jax
import numpy as np

from moejax.engine import Engine


def test_long_decode_device_memory_is_flat(host_model):
  engine = Engine(host_model, policy="smoe", alpha=0.3, cache_slots=4)
  live = []
  step = engine._step

  def recording_step(*args, **kwargs):
    out = step(*args, **kwargs)
    live.append(sum(a.nbytes for a in jax.live_arrays() if a.sharding.memory_kind in (None, "device")))
    return out

  engine._step = recording_step
  engine.generate(np.arange(5)[None], 1000)
  assert len(live) == 1000  # prefill + 999 decode steps
  steady = np.asarray(live[20:])
  # After warm-up every step ends with exactly the same live device bytes.
  assert steady.max() == steady.min(), (steady.min(), steady.max())
