"""Sweeps on Ray (`--config.backend=ray`) against a local 2-CPU Ray instance that this module starts and stops.

The runs are real sweeps of the shipped model at tiny settings: `backend=ray` writes the rows that
`backend=local` writes; a point that raises or kills its worker is retried, then recorded as failed while the
others finish; a driver killed mid-sweep and restarted completes the file without losing or repeating a point.
Every process here shares one JAX compilation cache, so a program compiles once for the whole module.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

# The Ray instance below serves this machine only: its processes talk over the loopback address. (Read when
# Ray is imported; Ray's switch for single-machine instances, named for the platforms where it is the default.)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray

import moejax.eval
from moejax.eval import sweep
from moejax.eval.tasks import PARAGRAPHS_PATH
from tests.eval.test_configs import ROOT, load
from tests.eval.test_sweep import comparable

REPO = pathlib.Path(__file__).parents[2]
POINTS = [{"policy": "smoe", "alpha": a} for a in (0.0, 0.1, 0.2, 0.3)]
TINY = (
  "--config.policies=('smoe',)",
  "--config.alphas=(0.0,0.1,0.2,0.3)",
  "--config.engine.cache_slots=8",
  "--config.speed.num_prompts=2",
  "--config.speed.prompt_len=8",
  "--config.speed.new_tokens=4",
  "--config.speed.batch=2",
  "--config.speed.profiles=('rtx3080ti_12gb',)",
  "--config.accuracy.tasks=()",
  f"--config.accuracy.perplexity_file={PARAGRAPHS_PATH}",
  "--config.accuracy.perplexity_window=16",
  "--config.accuracy.perplexity_context=4",
  "--config.accuracy.perplexity_max_tokens=16",
  "--config.accuracy.batch_size=2",
)  # the model is the shipped one; its costs default to a hardware profile, so rows repeat exactly


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
  """A local Ray instance with 2 CPUs on the loopback address; this process stays connected to it.

  Its workers, and the sweeps below, share one JAX compilation cache (environment variables set for the
  module and read when each process starts), so each program compiles once for the whole module.
  """
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    mp.delenv("RAY_AUTH_MODE", raising=False)  # Ray sets it for the processes that join the instance
    info = ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
      address = info.address_info["gcs_address"]
      assert address.startswith("127.0.0.1:"), f"the test instance must stay on the loopback address: {address}"
      yield address
    finally:
      ray.shutdown()


@pytest.fixture
def env(ray_address):
  """The environment of the sweeps that this module starts as subprocesses."""
  return dict(os.environ)


def start_sweep(out, env, *overrides) -> subprocess.Popen:
  """`experiments/sweep_alpha.py` at the tiny settings as a subprocess (its output next to `out`)."""
  cmd = [
    sys.executable,
    "experiments/sweep_alpha.py",
    "--config=configs/sweep_alpha.py",
    *TINY,
    f"--config.out={out}",
    *overrides,
  ]
  log = pathlib.Path(f"{out}.{time.monotonic_ns()}.log")
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def finish(proc: subprocess.Popen, timeout: float = 300) -> None:
  try:
    proc.wait(timeout)
  finally:
    proc.kill()
  if proc.returncode != 0:
    pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{proc.log.read_text()[-5000:]}")


def test_ray_writes_the_rows_local_writes(ray_address, env, tmp_path):
  local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
  finish(start_sweep(local, env, "--config.backend=local"))
  finish(start_sweep(distributed, env, "--config.backend=ray", f"--config.ray.address={ray_address}"))
  local_rows, ray_rows = sweep.load_rows(local), sweep.load_rows(distributed)
  assert [r["point"] for r in local_rows] == POINTS
  assert sorted(map(comparable, ray_rows)) == sorted(map(comparable, local_rows))
  assert len({r["result"]["accuracy"]["perplexity"]["nll"] for r in local_rows}) > 1  # the points differ


def test_failing_points_are_retried_then_recorded(ray_address, tmp_path):
  cfg = load(
    ROOT / "sweep_alpha.py",
    *TINY,
    f"--config.out={tmp_path / 'r.jsonl'}",
    "--config.backend=ray",
    "--config.ray.max_retries=1",
  )
  tries = tmp_path / "tries"
  tries.mkdir()
  raises, dies = POINTS[1], POINTS[2]

  def evaluate(model, tokenizer, cfg, point):  # runs on the workers (pickled by value)
    with open(tries / str(point["alpha"]), "a") as f:
      f.write("x")
    if point == raises:
      raise RuntimeError("injected failure")
    if point == dies:
      os._exit(3)  # the worker process dies mid-point
    return sweep.evaluate_point(model, tokenizer, cfg, point)

  rows = sweep.sweep(cfg, POINTS, evaluate)
  assert sorted(r["point"]["alpha"] for r in rows) == [0.0, 0.3]
  assert {p.name: len(p.read_text()) for p in tries.iterdir()} == {"0.0": 1, "0.1": 2, "0.2": 2, "0.3": 1}
  failures = {f["point"]["alpha"]: f["error"] for f in sweep.ResultsFile(cfg.out, sweep.setup_of(cfg)).failures}
  assert failures.keys() == {0.1, 0.2}
  assert failures[0.1]["type"] == "RuntimeError" and failures[0.1]["message"] == "injected failure"
  assert "injected failure" in failures[0.1]["traceback"] and failures[0.1]["attempts"] == 2
  assert isinstance(getattr(ray.exceptions, failures[0.2]["type"])(), ray.exceptions.RayActorError)
  assert failures[0.2]["attempts"] == 2


def test_killed_driver_resumes_without_losing_or_repeating(ray_address, env, tmp_path):
  out = tmp_path / "r.jsonl"
  args = ("--config.backend=ray", f"--config.ray.address={ray_address}")
  driver = start_sweep(out, env, *args)
  try:
    while len(sweep.load_rows(out) if out.exists() else []) < 2:
      assert driver.poll() is None, "the sweep finished before it could be killed"
      time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
  finally:
    driver.kill()
  complete = out.read_text().split("\n")[:-1]  # a line cut by the kill would have no newline yet
  assert 2 <= len(complete) < 4
  finish(start_sweep(out, env, *args))
  after = out.read_text().splitlines()
  assert after[: len(complete)] == complete  # nothing finished before the kill is lost or rewritten
  assert len(after) == 4 and sorted(r["point"]["alpha"] for r in sweep.load_rows(out)) == [0.0, 0.1, 0.2, 0.3]


def test_ray_backend_without_ray_names_the_extra(monkeypatch, tmp_path):
  cfg = load(ROOT / "sweep_alpha.py", *TINY, f"--config.out={tmp_path / 'r.jsonl'}", "--config.backend=ray")
  monkeypatch.delitem(sys.modules, "moejax.eval.distributed", raising=False)
  monkeypatch.delattr(moejax.eval, "distributed", raising=False)
  monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
  with pytest.raises(ImportError, match=r'pip install -e "\.\[distributed\]"'):
    sweep.sweep(cfg, POINTS)
