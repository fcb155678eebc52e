"""The local lm-eval tasks load offline from any working directory through the include path."""

import os

import pytest
from lm_eval.tasks import TaskManager

from moejax.eval.tasks import TAG, TASK_NAMES, TASKS_DIR


def test_tasks_load_from_another_cwd(tmp_path, monkeypatch):
  assert os.environ["HF_DATASETS_OFFLINE"] == "1"
  monkeypatch.chdir(tmp_path)
  tasks = TaskManager(include_path=TASKS_DIR, include_defaults=False).load([TAG])["tasks"]
  sizes = {name: len(list(task.test_docs())) for name, task in tasks.items()}
  assert set(sizes) == set(TASK_NAMES)
  assert sizes == {"moejax_capitals": 70, "moejax_opposites": 80, "moejax_arithmetic": 120, "moejax_paragraphs": 30}
  capitals = tasks["moejax_capitals"]
  doc = next(iter(capitals.test_docs()))
  assert capitals.doc_to_text(doc) == "Question: What is the capital of France?\nAnswer:"
  assert capitals.doc_to_choice(doc)[capitals.doc_to_target(doc)] == "Paris"


@pytest.mark.parametrize("name", ["capitals", "opposites", "arithmetic"])
def test_data_files_are_absolute(name):
  from moejax.eval.tasks import data

  path = getattr(data, name)["test"]
  assert os.path.isabs(path) and os.path.exists(path)
