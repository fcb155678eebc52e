"""Resumable sweeps: speed and accuracy of (policy, alpha) points, one JSONL row per point.

A sweep setup is one `ml_collections.ConfigDict` (`base_config` holds its
fields and defaults; `configs/*.py` set them). Each point builds an `Engine`
over the loaded model with the point's policy and alpha, measures decode
speed (`speed.measure_decode`, with edge-GPU estimates) and accuracy (lm-eval
tasks through `MoejaxLM` and / or perplexity of a text file), and appends one
row to a JSONL file: `{"point", "setup", "result", "finished_at"}`.

`ResultsFile` makes sweeps resumable: rows are appended with flush + fsync
once a point is finished; a restarted sweep skips the points already in the
file (matched by their parameters) and never repeats one. A line that is not a
complete row (the last line, cut short by a crash) is moved to
`<file>.corrupt`, never dropped, and its point runs again. Rows from a
different setup make it refuse to continue.

`sweep_config` adds how points run: `backend="local"` evaluates them one
after another in this process; `backend="ray"` fans them out over a Ray
cluster (`moejax.eval.distributed`), which the same file resumes across: a
sweep started locally may be finished on a cluster. There a point that fails
on every try is recorded as a row with `"error"` (`{"type", "message",
"traceback", "attempts"}`) in place of `"result"`: readers skip such rows,
and a restarted sweep runs the point again (a success appends its row; the
failure row stays as the record of what happened).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging
from ml_collections import config_dict

import moejax
from moejax.checkpoints.loader import resolve_dtype
from moejax.engine import Engine, costs
from moejax.eval import perplexity, speed
from moejax.eval.scoring import SCORING_MODES
from moejax.eval.tasks import PARAGRAPHS_PATH, task_manager
from moejax.eval.tokenizer import load_tokenizer
from moejax.models.config import from_hf_config, load_hf_config_dict
from moejax.offload.slots import resolve_cache_slots
from moejax.scheduling import get_policy
from moejax.scheduling.routing import SUBSTITUTE_WEIGHTS
from moejax.scheduling.similarity import load_similarity
from moejax.sim import PROFILES, get_profile

# Config fields that enumerate points rather than describe the setup.
GRID_FIELDS = ("policies", "alphas", "alpha", "points", "scopes")
# Config fields that say where rows go and where points run: a sweep resumes under other values.
RUN_FIELDS = ("out", "backend", "ray")
BACKENDS = ("local", "ray")


def base_config() -> ml_collections.ConfigDict:
  """Fields of a speed / accuracy setup, with defaults (model must be set)."""
  c = ml_collections.ConfigDict()
  c.model = moejax.default_model_path()  # HF checkpoint directory (default: the shipped model)
  c.tokenizer = ""  # default: the checkpoint's own
  c.dtype = "float32"
  c.engine = ml_collections.ConfigDict(
    {
      # At most one of: slots per MoE layer, a fraction of each layer's experts, a byte budget for all layers.
      "cache_slots": config_dict.placeholder(int),
      "cache_fraction": config_dict.placeholder(float),
      "cache_bytes": config_dict.placeholder(int),
      "cache_scope": config_dict.placeholder(str),  # "layer" / "global" (one pool for every MoE layer); unset: policy's
      "window": 8,
      "substitute_weight": "own",
      "policy_in_prefill": False,
      "similarity": "",  # .npz from experiments/similarity.py; default router cosine
      # Load/CPU split costs (moejax.engine.costs): a profile name or "LOAD_S,CPU_S" keeps rows repeatable;
      # "calibrate" measures this machine (wall clock, so a re-run may split differently).
      "costs": costs.DEFAULT_FIXED,
    }
  )
  c.speed = ml_collections.ConfigDict(
    {
      "prompt_file": PARAGRAPHS_PATH,
      "num_prompts": 4,
      "prompt_len": 32,
      "new_tokens": 32,
      "batch": 1,
      "profiles": tuple(sorted(PROFILES)),
      "target_dtype_bytes": 2,  # estimate fp16 weights on the edge GPUs, as the paper runs them
    }
  )
  c.accuracy = ml_collections.ConfigDict(
    {
      "tasks": ("moejax_simple",),  # lm-eval task / tag names; () for none
      "limit": config_dict.placeholder(int),
      "batch_size": 4,
      "max_length": config_dict.placeholder(int),
      "perplexity_file": "",  # a UTF-8 text file; "" for none
      "perplexity_window": 256,
      "perplexity_context": 32,
      "perplexity_max_tokens": config_dict.placeholder(int),
      "perplexity_mode": "decode",
    }
  )
  return c


def sweep_config() -> ml_collections.ConfigDict:
  """A setup (`base_config`) plus how its points run: `backend` and its `ray` options."""
  c = base_config()
  c.backend = "local"  # "local": this process, point after point; "ray": points fan out over a Ray cluster
  c.ray = ml_collections.ConfigDict(
    {
      "address": "",  # "": start a local Ray instance; "auto": the cluster `ray start` joined; or "HOST:PORT"
      "num_cpus_per_point": 1.0,  # resources each worker (one point at a time) holds
      "num_gpus_per_point": 0.0,
      "max_retries": 2,  # tries after the first before a point is recorded as failed
    }
  )
  return c


def setup_of(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The part of a config that must match for rows to be resumed (everything but the grid, output and backend)."""
  cfg = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
  return json.loads(json.dumps({k: v for k, v in cfg.items() if k not in GRID_FIELDS + RUN_FIELDS}))


def check_config(cfg) -> None:
  """Checks a setup on the host before anything is loaded (reads only the checkpoint's config.json).

  Policy names, cache options, costs and hardware profiles go through the
  library's own checks. Raises ValueError naming the `--config.FIELD` at fault
  and the fix.
  """

  def fail(field: str, fix: str):
    return ValueError(f"--config.{field}={_field(cfg, field)!r}: {fix}")

  def library_check(fields: Sequence[str], check: Callable[[], Any]) -> Any:
    try:
      return check()
    except (ValueError, FileNotFoundError) as e:
      named = [f for f in fields if _field(cfg, f) is not None] or fields
      raise ValueError(", ".join(f"--config.{f}={_field(cfg, f)!r}" for f in named) + f": {e}") from e

  def count(field: str, low: int, optional: bool = False) -> None:
    value = _field(cfg, field)
    if optional and value is None:
      return
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low):
      raise fail(field, f"use an integer >= {low}" + (" (or leave it unset)." if optional else "."))

  def number(field: str, low: float) -> None:
    value = _field(cfg, field)
    if not (_is_real(value) and value >= low):
      raise fail(field, f"use a number >= {low}.")

  def existing_file(field: str, optional: bool = True) -> None:
    path = _field(cfg, field)
    if (path or not optional) and not os.path.isfile(path):
      raise fail(field, "no such file; give an existing path" + (', or "" for none.' if optional else "."))

  if not cfg.model:
    raise ValueError("Set --config.model=DIR (a HuggingFace MoE checkpoint directory).")
  config = library_check(["model"], lambda: from_hf_config(load_hf_config_dict(cfg.model)))
  dtype = library_check(["dtype"], lambda: resolve_dtype(cfg.dtype))

  for field in ("policy", "policies"):
    if field in cfg:
      for name in [cfg[field]] if field == "policy" else cfg[field]:
        library_check([field], functools.partial(get_policy, name))
  alphas = {"alpha": [cfg.get("alpha")], "alphas": cfg.get("alphas", ())}
  if "points" in cfg:
    for point in cfg.points:
      if len(point) != 2:
        raise fail("points", "give (policy, alpha) pairs.")
      library_check(["points"], functools.partial(get_policy, point[0]))
    alphas["points"] = [alpha for _, alpha in cfg.points]
  for field, values in alphas.items():
    if field in cfg:
      for alpha in values:
        if not (_is_real(alpha) and alpha >= 0):
          raise fail(
            field,
            f"alpha {alpha!r} is not a number >= 0; alpha = 0 computes the model exactly, "
            "larger alphas substitute more.",
          )

  cache = ["engine.cache_slots", "engine.cache_fraction", "engine.cache_bytes", "engine.cache_scope"]
  for scope in cfg.get("scopes", ()) or [cfg.engine.cache_scope or "layer"]:
    library_check(
      cache + ["scopes"] * ("scopes" in cfg),
      lambda: resolve_cache_slots(
        config,
        cache_slots=cfg.engine.cache_slots,
        cache_fraction=cfg.engine.cache_fraction,
        cache_bytes=cfg.engine.cache_bytes,
        dtype_bytes=dtype.itemsize,
        scope=scope,
      ),
    )
  library_check(["engine.costs"], lambda: costs.resolve_costs(cfg.engine.costs, config))
  count("engine.window", 1)
  if cfg.engine.substitute_weight not in SUBSTITUTE_WEIGHTS:
    raise fail("engine.substitute_weight", f"use one of {SUBSTITUTE_WEIGHTS}.")
  existing_file("engine.similarity")

  existing_file("speed.prompt_file", optional=False)
  for field in ("speed.num_prompts", "speed.prompt_len", "speed.new_tokens", "speed.batch", "speed.target_dtype_bytes"):
    count(field, 1)
  for name in cfg.speed.profiles:
    library_check(["speed.profiles"], functools.partial(get_profile, name))

  if "accuracy" in cfg:
    count("accuracy.batch_size", 1)
    for field in ("accuracy.limit", "accuracy.max_length", "accuracy.perplexity_max_tokens"):
      count(field, 1, optional=True)
    existing_file("accuracy.perplexity_file")
    count("accuracy.perplexity_window", 2)
    count("accuracy.perplexity_context", 1)
    if cfg.accuracy.perplexity_context >= cfg.accuracy.perplexity_window:
      raise fail(
        "accuracy.perplexity_context",
        f"use fewer tokens than --config.accuracy.perplexity_window={cfg.accuracy.perplexity_window}.",
      )
    if cfg.accuracy.perplexity_mode not in SCORING_MODES:
      raise fail("accuracy.perplexity_mode", f"use one of {SCORING_MODES}.")

  if "backend" in cfg:
    if cfg.backend not in BACKENDS:
      raise fail("backend", f"use one of {BACKENDS}.")
    number("ray.num_cpus_per_point", 0)
    number("ray.num_gpus_per_point", 0)
    count("ray.max_retries", 0)


def _field(cfg, dotted: str) -> Any:
  for name in dotted.split("."):
    cfg = cfg[name]
  return cfg


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def engine_options(engine_cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Engine keyword arguments from the config's `engine` block (unset fields dropped)."""
  opts = {k: v for k, v in dict(engine_cfg).items() if v is not None and k != "similarity"}
  if engine_cfg.get("similarity"):
    opts["similarity"] = load_similarity(engine_cfg["similarity"])[0]
  return opts


def load_setup(cfg) -> tuple[moejax.Model, Any]:
  """(model with routed experts on the host, tokenizer) of a config."""
  if not cfg.model:
    raise ValueError("Set --config.model=DIR (a HuggingFace MoE checkpoint directory).")
  return moejax.load(cfg.model, dtype=cfg.dtype, experts="host"), load_tokenizer(cfg.model, cfg.tokenizer or None)


def measure_speed(engine: Engine, tokenizer, speed_cfg) -> dict[str, Any]:
  """`speed.measure_decode` on windows of the config's prompt file: each prompt's continuation is teacher-forced."""
  windows = speed.text_windows(
    tokenizer, speed_cfg.prompt_file, speed_cfg.num_prompts, speed_cfg.prompt_len + speed_cfg.new_tokens
  )
  return speed.measure_decode(
    engine,
    windows,
    speed_cfg.prompt_len,
    batch=speed_cfg.batch,
    profiles=tuple(speed_cfg.profiles),
    target_dtype_bytes=speed_cfg.target_dtype_bytes,
  )


def measure_accuracy(engine: Engine, tokenizer, acc) -> dict[str, Any]:
  """lm-eval metrics per task ({task: {metric: value}}) and / or perplexity of a text file."""
  from lm_eval import simple_evaluate

  from moejax.eval.lm_eval import MoejaxLM

  out: dict[str, Any] = {}
  if acc.tasks:
    engine.reset()
    lm = MoejaxLM(engine, tokenizer, batch_size=acc.batch_size, max_length=acc.max_length)
    results = simple_evaluate(
      model=lm,
      tasks=list(acc.tasks),
      limit=acc.limit,
      task_manager=task_manager(),
      bootstrap_iters=0,
      log_samples=False,
    )
    out["tasks"] = {
      task: {k: v for k, v in metrics.items() if "," in k and "_stderr" not in k}
      for task, metrics in results["results"].items()
    }
    stats = lm.stats()
    out["engine"] = {k: stats[k] for k in ("hit_ratio", "substitution_rate", "decode_steps")}
  if acc.perplexity_file:
    engine.reset()
    ppl = perplexity.file_perplexity(
      engine,
      tokenizer,
      acc.perplexity_file,
      window=acc.perplexity_window,
      context=acc.perplexity_context,
      batch_size=acc.batch_size,
      mode=acc.perplexity_mode,
      max_tokens=acc.perplexity_max_tokens,
    )
    out["perplexity"] = {
      "perplexity": ppl.perplexity,
      "nll": ppl.nll,
      "tokens": ppl.tokens,
      "hit_ratio": ppl.stats["hit_ratio"],
      "substitution_rate": ppl.stats["substitution_rate"],
    }
  return out


def evaluate_point(model: moejax.Model, tokenizer, cfg, point: Mapping[str, Any]) -> dict[str, Any]:
  """Speed and accuracy of one {"policy", "alpha"[, "cache_scope"]} point of a setup.

  The speed run records the routing, so the row also has the distinct experts
  per layer, their reuse, and the oracle bounds at this cache size
  (`speed.routing_figures`).
  """
  options = engine_options(cfg.engine) | {"record_routing": True}
  if point.get("cache_scope"):
    options["cache_scope"] = point["cache_scope"]
  engine = Engine(model, policy=point["policy"], alpha=point["alpha"], **options)
  measured = measure_speed(engine, tokenizer, cfg.speed)
  measured.pop("trace")
  measured["measured"].pop("per_layer")
  split = {} if engine.fixed_costs is None else {"costs": costs.describe(engine.fixed_costs)}
  return {"speed": measured, "accuracy": measure_accuracy(engine, tokenizer, cfg.accuracy), **split}


def point_key(point: Mapping[str, Any]) -> str:
  """A point's parameters as a hashable string, the same whatever their order."""
  return json.dumps(point, sort_keys=True)


def _parse_row(line: bytes) -> dict[str, Any] | None:
  """The row one JSONL line holds, or None where it holds none (cut short by a crash, or not a row)."""
  try:
    row = json.loads(line)
  except ValueError:  # not JSON, or not UTF-8
    return None
  if isinstance(row, dict) and {"point", "setup"} <= row.keys() and ("result" in row or "error" in row):
    return row
  return None


def _read_lines(path: str) -> tuple[bytes, list[tuple[bytes, dict[str, Any] | None]]]:
  """(the file's bytes, each non-blank line with its row or None)."""
  with open(path, "rb") as f:
    data = f.read()
  return data, [(line, _parse_row(line)) for line in data.split(b"\n") if line.strip()]


def _write_durably(path: str, data: bytes, mode: str) -> None:
  with open(path, mode) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


class ResultsFile:
  """An append-only JSONL file of finished points (see the module docstring).

  Args:
    path: the file (created with its folder if missing).
    setup: JSON-able description every row must share.

  Attributes:
    rows: the rows with a result, in file order.
    failures: the failure rows of points that have no result yet.
  """

  def __init__(self, path: str | os.PathLike, setup: Mapping[str, Any]):
    self.path = os.fspath(path)
    self.corrupt_path = self.path + ".corrupt"
    self.setup = json.loads(json.dumps(setup))
    self.rows: list[dict[str, Any]] = []
    self.failures: list[dict[str, Any]] = []
    if os.path.exists(self.path):
      self._load()

  def _load(self) -> None:
    data, lines = _read_lines(self.path)
    for _, row in lines:
      if row is not None and row["setup"] != self.setup:
        raise ValueError(
          f"{self.path} holds results of a different setup; write this one to another file "
          f"(--config.out=...) or restore the setup.\nfile: {row['setup']}\nnow:  {self.setup}"
        )
    bad = [line for line, row in lines if row is None]
    if bad or (data and not data.endswith(b"\n")):
      self._set_aside(bad, [line for line, row in lines if row is not None])
    self.rows = [row for _, row in lines if row is not None and "result" in row]
    self.failures = [row for _, row in lines if row is not None and "error" in row and not self.done(row["point"])]

  def _set_aside(self, bad: Sequence[bytes], good: Sequence[bytes]) -> None:
    """Appends `bad` lines to the .corrupt file, then atomically rewrites the file as the `good` lines."""
    if bad:
      _write_durably(self.corrupt_path, b"".join(line + b"\n" for line in bad), "ab")
      logging.warning(
        "%s: %d line(s) that are not complete rows (the last one cut short by a crash?) moved to "
        "%s; their points run again.",
        self.path,
        len(bad),
        self.corrupt_path,
      )
    tmp = self.path + ".tmp"
    _write_durably(tmp, b"".join(line + b"\n" for line in good), "wb")
    os.replace(tmp, self.path)

  def done(self, point: Mapping[str, Any]) -> bool:
    """Whether the file holds a result for `point`."""
    return any(point_key(row["point"]) == point_key(point) for row in self.rows)

  def append(self, point: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """Writes one finished point durably (flush + fsync) and returns its row."""
    row = self._write({"point": dict(point), "setup": self.setup, "result": result})
    self.rows.append(row)
    self.failures = [f for f in self.failures if point_key(f["point"]) != point_key(point)]
    return row

  def append_failure(self, point: Mapping[str, Any], error: Mapping[str, Any]) -> dict[str, Any]:
    """Writes the failure row of a point that failed every try (`error`: type, message, ...) and returns it."""
    row = self._write({"point": dict(point), "setup": self.setup, "error": dict(error)})
    self.failures.append(row)
    return row

  def _write(self, row: dict[str, Any]) -> dict[str, Any]:
    row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    _write_durably(self.path, (json.dumps(row) + "\n").encode("utf-8"), "ab")
    return row


def run_points(
  path: str | os.PathLike,
  setup: Mapping[str, Any],
  points: Sequence[Mapping[str, Any]],
  evaluate: Callable[[Mapping[str, Any]], Mapping[str, Any]],
) -> list[dict[str, Any]]:
  """Evaluates the points not yet in `path`, appending each as it finishes; returns every row of the file."""
  results = ResultsFile(path, setup)
  todo = [p for p in points if not results.done(p)]
  logging.info("%s: %d of %d points done, %d to run.", path, len(points) - len(todo), len(points), len(todo))
  for i, point in enumerate(todo):
    logging.info("point %d/%d: %s", i + 1, len(todo), point)
    results.append(point, evaluate(point))
  return results.rows


def sweep(
  cfg, points: Sequence[Mapping[str, Any]], evaluate: Callable[..., Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
  """Runs each unfinished point into `cfg.out` on `cfg.backend`; returns the rows with a result.

  Args:
    cfg: a `sweep_config()`; checked (`check_config`) before anything is loaded.
    points: `{"policy", "alpha"}` dicts.
    evaluate: `(model, tokenizer, cfg, point) -> result` (default `evaluate_point`). The local backend
      loads the model once, if any point is left; on Ray each worker loads it once and it must pickle.
  """
  check_config(cfg)
  evaluate = evaluate_point if evaluate is None else evaluate
  if cfg.backend == "ray":
    from moejax.eval import distributed  # Ray is an optional extra

    return distributed.run_points(cfg, points, evaluate)
  loaded = functools.cache(lambda: load_setup(cfg))
  return run_points(cfg.out, setup_of(cfg), points, lambda point: evaluate(*loaded(), cfg, point))


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows with a result of a sweep file (failure rows and lines that are not complete rows are skipped)."""
  _, lines = _read_lines(os.fspath(path))
  return [row for _, row in lines if row is not None and "result" in row]


def tpot_of(row: Mapping[str, Any], source: str = "measured") -> float:
  """A row's TPOT in seconds: "measured", or the estimate on the named hardware profile."""
  sp = row["result"]["speed"]
  if source == "measured":
    return sp["measured"]["tpot_s"]
  if source not in sp["estimate"]:
    raise ValueError(f"no estimate for profile {source!r} in this sweep; it has {sorted(sp['estimate'])}.")
  return sp["estimate"][source]["tpot_s"]


def accuracy_metrics(row: Mapping[str, Any]) -> dict[str, float]:
  """Flat {"task/metric": value} of a row's lm-eval metrics and perplexity."""
  acc = row["result"]["accuracy"]
  out = {
    f"{task}/{metric}": value
    for task, metrics in acc.get("tasks", {}).items()
    for metric, value in metrics.items()
    if isinstance(value, (int, float))
  }
  if "perplexity" in acc:
    out["perplexity"] = acc["perplexity"]["perplexity"]
  return out


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """One line per row: policy, alpha, measured TPOT / TTFT, hit and substitution ratios, accuracy metrics."""
  lines = [f"{'policy':10s} {'alpha':>6s} {'TPOT ms':>8s} {'TTFT ms':>8s} {'hit':>6s} {'subst':>6s}  accuracy"]
  for row in rows:
    m = row["result"]["speed"]["measured"]
    acc = ", ".join(f"{k}={v:.4g}" for k, v in sorted(accuracy_metrics(row).items()))
    lines.append(
      f"{row['point']['policy']:10s} {row['point']['alpha']:6.3f} {m['tpot_s'] * 1e3:8.2f} "
      f"{m['ttft_s'] * 1e3:8.2f} {m['hit_ratio']:6.3f} {m['substitution_rate']:6.3f}  {acc}"
    )
  return "\n".join(lines)
