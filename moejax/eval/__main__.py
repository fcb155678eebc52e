"""lm-eval's command line with the "moejax" model registered and the local tasks included.

  python -m moejax.eval --model moejax \
      --model_args pretrained=DIR,policy=smoe,alpha=0.3,cache_fraction=0.25 --tasks moejax_simple --batch_size 4

Arguments are lm-eval's (`lm-eval run --help`); `--include_path` defaults to
`moejax/eval/tasks`.
"""

import sys

from lm_eval.__main__ import cli_evaluate

import moejax.eval.lm_eval  # noqa: F401  (registers the model)
from moejax.eval.tasks import TASKS_DIR

if __name__ == "__main__":
  if "--include_path" not in sys.argv and sys.argv[1:2] not in (["ls"], ["validate"]):
    sys.argv += ["--include_path", TASKS_DIR]
  cli_evaluate()
