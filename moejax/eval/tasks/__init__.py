"""Offline lm-eval tasks (YAML + data in this folder); see README.md.

`TASKS_DIR` is the folder to pass as lm-eval's include_path;
`task_manager()` returns a `TaskManager` that knows these tasks.
"""

import pathlib

from moejax.eval.tasks.data import PARAGRAPHS_PATH

TASKS_DIR = str(pathlib.Path(__file__).resolve().parent)
TASK_NAMES = ("moejax_capitals", "moejax_opposites", "moejax_arithmetic", "moejax_paragraphs")
TAG = "moejax_simple"  # every task above carries it


def task_manager(include_defaults: bool = True):
  """An `lm_eval.tasks.TaskManager` with this folder on its include path.

  include_defaults=False indexes only these tasks (much faster than indexing lm-eval's own).
  """
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=TASKS_DIR, include_defaults=include_defaults)


__all__ = ["PARAGRAPHS_PATH", "TAG", "TASKS_DIR", "TASK_NAMES", "task_manager"]
