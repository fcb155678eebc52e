"""`benchmarks/gpu_check.sh --dry-run`: the GPU readiness script runs end to end on CPU with tiny settings."""

import json
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
  env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
  proc = subprocess.run(
    ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "skipping" in proc.stdout and "pip install" in proc.stdout  # the CUDA install is only announced
  log = (tmp_path / "gpu_check.log").read_text()
  report = json.loads(log[: log.rindex("}") + 1])
  assert report["backend"] == "cpu" and report["memory"]["peak_device_bytes"] is None
  assert report["transfer"]["slot_fill_GBps"] > 0 and report["transfer"]["device_put_GBps"] > 0
  scale = json.loads((tmp_path / "gpu_check_scale_dry_run.json").read_text())
  (row,) = scale["rows"]
  assert "error" not in row, row
  assert row["policy"] == "lru" and row["tpot_s"] > 0 and row["routing"]
