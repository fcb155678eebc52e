"""Trace records: validation and JSON round trip."""

import json

import numpy as np
import pytest

from moejax.sim import LayerEvent, StepTrace, load_trace, save_trace, trace_from_json, trace_to_json


def _trace():
  layers = (
    LayerEvent(layer=0, tokens=2, dense_bytes=1000, expert_bytes=0),  # dense layer
    LayerEvent(
      layer=1,
      tokens=2,
      dense_bytes=1000,
      expert_bytes=500,
      hits=3,
      demand_loads=1,
      prefetch_loads=2,
      prefetch_used=1,
      cpu_experts=2,
      substituted=4,
      predictor_bytes=300,
      predictor="provisional",
      split="balance",
      gpu_pairs=6,
      demand_pairs=2,
      cpu_pairs=3,
      measured={"attention": 1e-3, "copy": 2e-3},
    ),
  )
  return [
    StepTrace(
      step=0, tokens=2, kind="prefill", layers=layers, head_bytes=4000, wall_s=0.5, dtype_bytes=4, hidden_size=64
    ),
    StepTrace(
      step=1,
      tokens=1,
      kind="decode",
      layers=(
        LayerEvent(layer=0, tokens=1, dense_bytes=1000, expert_bytes=0),
        LayerEvent(layer=1, tokens=1, dense_bytes=1000, expert_bytes=500, layerwise_loads=8, hits=2),
      ),
      head_bytes=4000,
      wall_s=0.1,
      dtype_bytes=4,
      hidden_size=64,
    ),
  ]


def test_json_round_trip_through_text():
  trace = _trace()
  text = json.dumps(trace_to_json(trace))
  assert trace_from_json(json.loads(text)) == trace


def test_save_and_load_file(tmp_path):
  trace = _trace()
  path = tmp_path / "trace.json"
  save_trace(path, trace)
  doc = json.loads(path.read_text())
  assert doc["format"] == "moejax.sim.trace" and doc["version"] == 2
  assert load_trace(path) == trace


def test_numpy_ints_become_python_ints_and_serialise():
  ev = LayerEvent(layer=np.int32(0), tokens=np.int64(1), dense_bytes=np.int64(10), expert_bytes=5, hits=np.int64(2))
  assert type(ev.hits) is int and type(ev.layer) is int
  st = StepTrace(
    step=0, tokens=1, kind="decode", layers=[ev], head_bytes=1, wall_s=np.float32(0.5), dtype_bytes=4, hidden_size=8
  )
  assert isinstance(st.layers, tuple)
  json.dumps(trace_to_json([st]))


def test_unknown_json_key_is_rejected():
  data = trace_to_json(_trace())
  data[1]["layers"][0]["hitz"] = 1
  with pytest.raises(ValueError, match="hitz"):
    trace_from_json(data)


def test_version_1_files_still_load():
  # Written by the version 1 engine: no predictor, split or demand_pairs; predictor
  # bytes were recorded only for the provisional predictor.
  layer = {"layer": 1, "tokens": 1, "dense_bytes": 1000, "expert_bytes": 500, "hits": 2, "demand_loads": 1}
  step = {"step": 0, "tokens": 1, "kind": "decode", "head_bytes": 10, "wall_s": 0.1, "dtype_bytes": 4, "hidden_size": 8}
  doc = {
    "format": "moejax.sim.trace",
    "version": 1,
    "steps": [step | {"layers": [layer | {"predictor_bytes": 300, "gpu_pairs": 3}, layer | {"layer": 2}]}],
  }
  ((with_predictor, plain),) = (st.layers for st in trace_from_json(doc))
  assert (with_predictor.predictor, with_predictor.predictor_bytes, with_predictor.gpu_pairs) == ("provisional", 300, 3)
  assert (plain.predictor, plain.split, plain.demand_pairs) == ("", "", None)
  doc["steps"][0]["layers"][1]["split"] = "balance"  # not a version 1 field
  with pytest.raises(ValueError, match="split"):
    trace_from_json(doc)
  with pytest.raises(ValueError, match="version"):
    trace_from_json(doc | {"version": 3})


def test_derived_counts():
  ev = _trace()[0].layers[1]
  assert ev.gpu_experts == 3 + 1 + 1
  assert ev.resident_experts == 3 + 1
  assert ev.wasted_prefetch == 2 - 1
  assert ev.copied_experts == 1 + 2
  assert ev.copied_bytes == 3 * 500


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"hits": -1}, "hits"),
    ({"prefetch_loads": 1, "prefetch_used": 2}, "prefetch_used"),
    ({"hits": 1, "gpu_pairs": 2}, "gpu_pairs"),
    ({"cpu_experts": 1, "cpu_pairs": 2}, "cpu_pairs"),
    ({"hits": 1.5}, "hits"),
    ({"predictor": "oracle"}, "predictor"),
    ({"split": "random"}, "split"),
    ({"predictor_bytes": 10}, "predictor_bytes"),
    ({"predictor": "activation", "predictor_bytes": 10}, "predictor_bytes"),
    ({"demand_loads": 1, "demand_pairs": 2}, "demand_pairs"),
    ({"hits": 1, "demand_loads": 1, "gpu_pairs": 2, "demand_pairs": 0}, "demand_pairs"),  # 2 pairs on 1 resident expert
    ({"demand_loads": 1, "gpu_pairs": 0, "demand_pairs": 1}, "demand_pairs"),  # more than the device pairs
  ],
)
def test_layer_event_validation(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    LayerEvent(layer=0, tokens=1, dense_bytes=1, expert_bytes=1, **kwargs)


def test_step_trace_validation():
  ev0 = LayerEvent(layer=0, tokens=1, dense_bytes=1, expert_bytes=1)
  ev1 = LayerEvent(layer=1, tokens=1, dense_bytes=1, expert_bytes=1)
  common = {"step": 0, "tokens": 1, "head_bytes": 1, "wall_s": 0.0, "dtype_bytes": 2, "hidden_size": 4}
  with pytest.raises(ValueError, match="kind"):
    StepTrace(kind="generate", layers=(ev0,), **common)
  with pytest.raises(ValueError, match="increasing layer order"):
    StepTrace(kind="decode", layers=(ev1, ev0), **common)
  with pytest.raises(ValueError, match="dtype_bytes"):
    StepTrace(kind="decode", layers=(ev0,), **(common | {"dtype_bytes": 0}))
