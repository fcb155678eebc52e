"""Absolute `data_files` for the task YAMLs beside this file.

lm-eval 0.4.13 hands `dataset_kwargs.data_files` to `datasets.load_dataset`
unchanged, and `datasets` resolves a relative path against the current
directory, not the YAML's. The YAMLs therefore say `data_files: !function
data.NAME`: lm-eval imports this file from the YAML's own directory and uses
the value below, which holds for any cwd and any `--include_path`.
"""

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def _test_split(filename: str) -> dict[str, str]:
  return {"test": str(_HERE / filename)}


capitals = _test_split("capitals.jsonl")
opposites = _test_split("opposites.jsonl")
arithmetic = _test_split("arithmetic.jsonl")
paragraphs = _test_split("paragraphs.txt")
PARAGRAPHS_PATH = paragraphs["test"]
