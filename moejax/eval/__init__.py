"""Evaluation: lm-eval adapter, perplexity, local tasks, speed, sweeps and alpha selection.

Modules:
  lm_eval: the lm-evaluation-harness model "moejax" (`MoejaxLM`), registered on import.
  scoring: batched (context, continuation) scoring through the engine's decode or prefill path.
  perplexity: perplexity of a local text file over rolling windows.
  tasks: offline lm-eval tasks (YAML + data) and their `TaskManager`.
  tokenizer: loading the model's tokenizer.
  speed: decode speed of one setup, measured and estimated on edge hardware profiles.
  sweep: resumable JSONL sweeps over (policy, alpha) points; the setup config schema and its checks.
  distributed: sweep points fanned out over a Ray cluster (the optional extra [distributed]).
  alpha: fitting TPOT(alpha) and choosing alpha under a latency budget.
  calibration: similarity matrices `[L, E, E]` of a loaded model.
  plots: figures from sweep files.

`python -m moejax.eval ...` is lm-eval's command line with "moejax" registered
and `moejax/eval/tasks` on the include path.
"""
