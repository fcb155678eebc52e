"""Orbax checkpoints of the full train state (step, parameters, optimizer state, elapsed time)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A manager writing `directory/<step>/`; keeps the newest `max_to_keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, state: dict[str, Any]) -> None:
  """Saves `state` under its own step (`state["step"]`) and waits until it is on disk."""
  manager.save(int(state["step"]), args=ocp.args.StandardSave(state))
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, like: dict[str, Any]) -> dict[str, Any] | None:
  """The newest checkpoint restored into the structure, shapes and dtypes of `like`; None if there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))
