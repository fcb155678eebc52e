"""Sweep points fanned out over a Ray cluster; the driver alone writes their rows to the sweep's JSONL file.

`moejax.eval.sweep.sweep` comes here for `--config.backend=ray`. The driver
joins the cluster (`--config.ray.address`; "" starts a local Ray instance),
starts one `PointWorker` actor per unfinished point, as many as the cluster's
CPUs and GPUs fit (`num_cpus_per_point`, `num_gpus_per_point`), and hands
each idle worker the next point. A worker loads the model and tokenizer at
its first point and evaluates every later one on them (each point builds its
own `Engine`). The driver appends each result as it arrives
(`sweep.ResultsFile`: fsync'd, resumable), so a killed driver loses only the
points in flight, and a restarted one runs exactly the points the file lacks.

A point whose evaluation raises, or whose worker dies (the worker is then
replaced), is tried again up to `max_retries` more times, then recorded as a
failure row (see `moejax.eval.sweep`), and the sweep goes on.

Ray is an optional extra: `pip install -e ".[distributed]"`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
from tqdm import tqdm

from moejax.eval import sweep

try:
  import ray
except ImportError as e:
  raise ImportError(
    '--config.backend=ray needs Ray: pip install -e ".[distributed]" (or pip install ray), '
    "or run with --config.backend=local."
  ) from e


@ray.remote(max_restarts=0)  # the driver replaces a worker that dies
class PointWorker:
  """Evaluates sweep points on one (model, tokenizer), loaded at the first point.

  Args:
    cfg: the sweep's config (its setup: model, dtype, engine, speed, accuracy).
    evaluate: `(model, tokenizer, cfg, point) -> result`.
  """

  def __init__(self, cfg, evaluate: Callable[..., Mapping[str, Any]]):
    self.cfg, self.evaluate_fn = cfg, evaluate
    self.loaded = None  # (model, tokenizer)

  def evaluate(self, point: Mapping[str, Any]) -> Mapping[str, Any]:
    if self.loaded is None:
      self.loaded = sweep.load_setup(self.cfg)
    return self.evaluate_fn(*self.loaded, self.cfg, point)


def run_points(
  cfg, points: Sequence[Mapping[str, Any]], evaluate: Callable[..., Mapping[str, Any]]
) -> list[dict[str, Any]]:
  """Runs the points that have no result in `cfg.out` on the Ray cluster of `cfg.ray`; returns the rows with one.

  Args:
    cfg: a `sweep.sweep_config()` with `backend="ray"`.
    points: `{"policy", "alpha"}` dicts.
    evaluate: `(model, tokenizer, cfg, point) -> result`, run on the workers (it must pickle).
  """
  results = sweep.ResultsFile(cfg.out, sweep.setup_of(cfg))
  todo = [p for p in points if not results.done(p)]
  logging.info("%s: %d of %d points done, %d to run on Ray.", cfg.out, len(points) - len(todo), len(points), len(todo))
  if not todo:
    return results.rows
  with _connected(cfg.ray.address):
    resources = {"num_cpus": cfg.ray.num_cpus_per_point, "num_gpus": cfg.ray.num_gpus_per_point}

    def start_worker():
      return PointWorker.options(**resources).remote(cfg, evaluate)

    idle = [start_worker() for _ in range(_pool_size(len(todo), cfg.ray))]
    queue = collections.deque(todo)
    tries = collections.Counter()
    running = {}  # call ref -> (worker, point)
    done, failed = len(points) - len(todo), 0
    bar = tqdm(total=len(points), initial=done, desc=os.path.basename(cfg.out), unit="point")
    try:
      while queue or running:
        while queue and idle:
          worker, point = idle.pop(), queue.popleft()
          tries[sweep.point_key(point)] += 1
          running[worker.evaluate.remote(point)] = (worker, point)
        bar.set_postfix(done=done, running=len(running), failed=failed)
        [ref], _ = ray.wait(list(running), num_returns=1)
        worker, point = running.pop(ref)
        result, error, worker_lives = _outcome(ref)
        if not worker_lives:
          ray.kill(worker)
          worker = start_worker()
        idle.append(worker)
        if error is None:
          results.append(point, result)
          done += 1
        else:
          attempts = tries[sweep.point_key(point)]
          logging.warning(
            "point %s failed (try %d of %d): %s: %s",
            point,
            attempts,
            1 + cfg.ray.max_retries,
            error["type"],
            error["message"],
          )
          if attempts <= cfg.ray.max_retries:
            queue.append(point)
            continue
          results.append_failure(point, {**error, "attempts": attempts})
          failed += 1
        bar.set_postfix(done=done, running=len(running), failed=failed, refresh=False)
        bar.update()
    finally:
      bar.close()
      for worker in idle + [w for w, _ in running.values()]:
        ray.kill(worker)
  if failed:
    logging.warning(
      "%s: %d point(s) failed on every try, recorded with their errors; rerun the sweep to try them again.",
      cfg.out,
      failed,
    )
  return results.rows


def _outcome(ref) -> tuple[Any, dict[str, str] | None, bool]:
  """(result, None, True) of a call that returned, or (None, error, whether its worker is still alive)."""
  try:
    return ray.get(ref), None, True
  except ray.exceptions.RayTaskError as e:  # evaluate raised; the worker lives on
    return None, {"type": type(e.cause).__name__, "message": str(e.cause), "traceback": str(e)}, True
  except ray.exceptions.RayError as e:  # the worker (or its node) died
    return None, {"type": type(e).__name__, "message": str(e), "traceback": ""}, False


def _pool_size(points: int, ray_cfg) -> int:
  """Workers to start: one per point, at most as many as the cluster's CPUs and GPUs fit."""
  have = ray.cluster_resources()
  n = points
  for resource, per_point in (("CPU", ray_cfg.num_cpus_per_point), ("GPU", ray_cfg.num_gpus_per_point)):
    if per_point > 0:
      n = min(n, int(have.get(resource, 0) // per_point))
  if n < 1:
    raise ValueError(
      f"The Ray cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs, less than one point "
      f"asks for (--config.ray.num_cpus_per_point={ray_cfg.num_cpus_per_point}, "
      f"--config.ray.num_gpus_per_point={ray_cfg.num_gpus_per_point}); lower them or add nodes that have them."
    )
  return n


@contextlib.contextmanager
def _connected(address: str):
  """Joins the cluster at `address` ("" starts a local Ray instance) unless this process has joined one already."""
  if ray.is_initialized():
    yield
    return
  with warnings.catch_warnings():
    # Starting a local instance forks-and-execs Ray's processes; JAX warns about any fork once it is imported.
    warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
    ray.init(address=address or "local")
  try:
    yield
  finally:
    ray.shutdown()
