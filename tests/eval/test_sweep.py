"""Resumable sweeps: a sweep that dies midway and is restarted loses no finished point and repeats none."""

import json

import pytest

from moejax.eval import sweep
from moejax.eval.tasks import PARAGRAPHS_PATH
from tests.eval.test_lm_eval import SHAPES

POINTS = [{"policy": "smoe", "alpha": a} for a in (0.0, 0.1, 0.2)]


def tiny_config(eval_path, out):
  cfg = sweep.sweep_config()
  cfg.model = str(eval_path)
  cfg.engine.cache_slots = 3
  # Shapes as in the other eval tests (batch 4, 16 prompt tokens, 32 cache rows): nothing compiles twice.
  cfg.speed.update(
    num_prompts=4, prompt_len=16, new_tokens=16, batch=SHAPES["batch_size"], profiles=("rtx3080ti_12gb",)
  )
  cfg.accuracy.update(
    tasks=(),
    batch_size=SHAPES["batch_size"],
    perplexity_file=PARAGRAPHS_PATH,
    perplexity_window=SHAPES["max_length"],
    perplexity_context=4,
    perplexity_max_tokens=24,
  )
  cfg.out = str(out)
  return cfg


def test_sweep_resumes_after_a_crash(eval_path, tmp_path, monkeypatch):
  cfg = tiny_config(eval_path, tmp_path / "runs" / "sweep.jsonl")
  evaluated, real = [], sweep.evaluate_point

  def dies_at_second_point(model, tokenizer, cfg, point):
    evaluated.append(point)
    if len(evaluated) == 2:
      raise KeyboardInterrupt("killed")
    return real(model, tokenizer, cfg, point)

  monkeypatch.setattr(sweep, "evaluate_point", dies_at_second_point)
  with pytest.raises(KeyboardInterrupt):
    sweep.sweep(cfg, POINTS)
  assert [r["point"] for r in sweep.load_rows(cfg.out)] == POINTS[:1]

  evaluated.clear()
  monkeypatch.setattr(sweep, "evaluate_point", lambda *a: evaluated.append(a[-1]) or real(*a))
  rows = sweep.sweep(cfg, POINTS)
  assert evaluated == POINTS[1:]  # the finished point is not repeated
  assert [r["point"] for r in rows] == [r["point"] for r in sweep.load_rows(cfg.out)] == POINTS
  row = rows[0]["result"]
  assert row["speed"]["estimate"]["rtx3080ti_12gb"]["label"] == "estimate"
  assert 0 <= row["speed"]["measured"]["hit_ratio"] <= 1 and row["accuracy"]["perplexity"]["tokens"] == 24
  # Everything done: nothing runs, nothing is loaded.
  monkeypatch.setattr(sweep, "load_setup", lambda cfg: pytest.fail("loaded a model with nothing to run"))
  assert len(sweep.sweep(cfg, POINTS)) == 3
  assert len(sweep.summary_table(rows).splitlines()) == 4


WALL_CLOCK = ("tpot_s", "ttft_s", "tpot_forward_only_s", "times_s")  # measured fields that vary from run to run


def comparable(row) -> str:
  """A row without its wall-clock fields, as JSON (NaN compares equal to NaN)."""
  row = json.loads(json.dumps(row))
  del row["finished_at"]
  for key in WALL_CLOCK:
    del row["result"]["speed"]["measured"][key]
  return json.dumps(row, sort_keys=True)


def test_the_same_setup_twice_writes_the_same_rows(eval_path, tmp_path):
  """With fixed load/CPU costs (the sweep default), accuracy and every count repeat exactly."""
  rows = []
  for name in ("first", "second"):
    cfg = tiny_config(eval_path, tmp_path / f"{name}.jsonl")
    rows.append([comparable(r) for r in sweep.sweep(cfg, POINTS[1:])])
  assert rows[0] == rows[1]
  assert json.loads(rows[0][0])["setup"]["engine"]["costs"] == "rtx4060ti_16gb"


def test_results_file_sets_aside_an_unfinished_line_and_checks_the_setup(tmp_path):
  path = tmp_path / "r.jsonl"
  results = sweep.ResultsFile(path, {"model": "a"})
  results.append({"policy": "lru", "alpha": 0.0}, {"x": 1})
  half_row = '{"point": {"policy": "lru", "alpha": 0.1}, "setu'  # a crash mid-write
  with open(path, "a") as f:
    f.write(half_row)
  with pytest.raises(ValueError, match="different setup"):
    sweep.ResultsFile(path, {"model": "b"})
  assert path.read_text().endswith(half_row)  # a refused resume changes nothing
  resumed = sweep.ResultsFile(path, {"model": "a"})
  assert (tmp_path / "r.jsonl.corrupt").read_text() == half_row + "\n"
  assert [r["point"] for r in resumed.rows] == [{"policy": "lru", "alpha": 0.0}]
  assert resumed.done({"alpha": 0.0, "policy": "lru"}) and not resumed.done({"policy": "lru", "alpha": 0.1})
  resumed.append({"policy": "lru", "alpha": 0.1}, {"x": 2})
  assert [json.loads(line)["result"]["x"] for line in path.read_text().splitlines()] == [1, 2]


def test_lines_that_are_not_rows_are_set_aside_never_dropped(tmp_path):
  path = tmp_path / "r.jsonl"
  sweep.ResultsFile(path, {}).append(POINTS[0], {"x": 1})
  rows = path.read_text()
  not_json = '{"point": {"policy": "smoe", "alpha": 0.1}, "setup": {}, "result": {"x": 2}]'  # complete-looking
  not_a_row = '{"point": {"policy": "smoe", "alpha": 0.2}}'
  last = json.dumps({"point": POINTS[2], "setup": {}, "result": {"x": 3}})  # whole, only its newline missing
  path.write_text(rows + not_json + "\n" + not_a_row + "\n" + last)
  assert [r["point"] for r in sweep.load_rows(path)] == [POINTS[0], POINTS[2]]  # readers skip, change nothing
  resumed = sweep.ResultsFile(path, {})
  assert (tmp_path / "r.jsonl.corrupt").read_text() == not_json + "\n" + not_a_row + "\n"
  assert path.read_text() == rows + last + "\n"
  assert [r["point"] for r in resumed.rows] == [POINTS[0], POINTS[2]]
  calls = []
  sweep.run_points(path, {}, POINTS, lambda p: calls.append(p) or {"x": 4})
  assert calls == [POINTS[1]]
  sweep.ResultsFile(path, {})  # a clean file: nothing more is set aside
  assert (tmp_path / "r.jsonl.corrupt").read_text().count("\n") == 2


def test_failure_rows_are_skipped_by_readers_and_retried_on_resume(tmp_path):
  path = tmp_path / "r.jsonl"
  results = sweep.ResultsFile(path, {})
  results.append(POINTS[0], {"x": 1})
  results.append_failure(POINTS[1], {"type": "RuntimeError", "message": "boom", "attempts": 3})
  assert [r["point"] for r in sweep.load_rows(path)] == [POINTS[0]]
  resumed = sweep.ResultsFile(path, {})
  assert [f["point"] for f in resumed.failures] == [POINTS[1]] and resumed.failures[0]["error"]["message"] == "boom"
  calls = []
  rows = sweep.run_points(path, {}, POINTS, lambda p: calls.append(p) or {"x": 2})
  assert calls == POINTS[1:]
  assert [r["point"] for r in rows] == [r["point"] for r in sweep.load_rows(path)] == [POINTS[0], *POINTS[1:]]
  assert len(path.read_text().splitlines()) == 4  # the failure row stays as the record of what happened
  assert sweep.ResultsFile(path, {}).failures == []


def test_run_points_skips_finished_points(tmp_path):
  path = tmp_path / "r.jsonl"
  calls = []
  sweep.run_points(path, {}, POINTS[:2], lambda p: calls.append(p) or {"n": len(calls)})
  sweep.run_points(path, {}, POINTS, lambda p: calls.append(p) or {"n": len(calls)})
  assert calls == POINTS
