"""One accounting for every policy (SPEC section 5b), and a prefetch predictor that does not read the answer."""

import pathlib
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import moejax
from moejax.engine import Engine, stages
from moejax.engine import engine as engine_lib
from moejax.engine.schedule import prefetch_layer
from moejax.scheduling import POLICIES
from tests.engine.conftest import TOP_K
from tests.models.hf_utils import build_hf_model, tiny_qwen2_moe_config

HELDOUT = pathlib.Path(__file__).parents[2] / "third_party" / "world_english_bible" / "heldout.txt"

PROMPTS = np.random.RandomState(1).randint(0, 61, (3, 6))
MASK = np.ones_like(PROMPTS)
MASK[2, :2] = 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_pair_is_counted_exactly_once(host_model, policy):
  """Per layer step: the four pair classes sum to the pairs, and their distinct experts are the experts computed."""
  engine = Engine(host_model, policy=policy, alpha=0.3, cache_slots=TOP_K + 1, record_routing=True, costs="0.002,0.001")
  result = engine.generate(PROMPTS, 5, MASK)
  config = host_model.config
  decode = [i for i, t in enumerate(result.trace) if t.kind == "decode"]
  for i in decode:
    for event in result.trace[i].layers:
      if event.layer not in config.moe_layer_ids:
        continue
      routing = result.routing[i][event.layer]
      assert event.gpu_pairs + event.cpu_pairs == routing.experts.size
      distinct = len(np.unique(routing.experts))
      assert event.hits + event.prefetch_used + event.demand_loads + event.cpu_experts == distinct
      assert event.prefetch_used <= event.prefetch_loads
  per_layer = result.stats["per_layer"]
  for l in config.moe_layer_ids:
    classes = sum(per_layer[f"pairs_{c}"][l] for c in ("resident", "prefetch", "demand", "cpu"))
    assert classes == per_layer["pairs"][l] == sum(result.routing[i][l].experts.size for i in decode)
  s = result.stats
  assert s["hit_ratio"] == pytest.approx((s["pair_classes"]["resident"] + s["pair_classes"]["prefetch"]) / s["pairs"])
  assert s["cache_hit_ratio"] == pytest.approx(s["pair_classes"]["resident"] / s["pairs"])
  expert_bytes = config.expert_param_count() * 4
  copies = sum(per_layer["demand_loads"]) + sum(per_layer["prefetched"]) + sum(per_layer["streamed"])
  assert s["bytes_to_device"] == copies * expert_bytes
  ahead = sum(per_layer["prefetched"]) + sum(per_layer["streamed"])  # copied before the layer's plan
  assert 0 <= s["wasted_prefetch_bytes"] == (ahead - s["prefetch_hits"]) * expert_bytes


class _RecordingOps(stages.StagedOps):
  """Staged stages that keep, per decoder layer, the real router scores and the scores its prefetch was given."""

  log: ClassVar[list] = []

  def run(self, name, layer, fn, *args, donate=()):
    out = super().run(name, layer, fn, *args, donate=donate)
    if fn is stages.attend_route:
      self.log.append(("scores", layer, np.asarray(out[2])))
    if getattr(fn, "func", None) is prefetch_layer:
      self.log.append(("predicted", layer, np.asarray(args[1])))
    if getattr(fn, "func", None) is stages.schedule_layer:
      self.log.append(("missed", layer, int(out.counters.pairs_demand + out.counters.pairs_cpu)))
    return out


def test_provisional_prediction_leaves_out_demand_loads(monkeypatch, tmp_path):
  """The paper's predictor sees only experts resident before the plan: when the previous MoE layer loaded an
  expert on demand, the prediction differs from the next layer's real scores; when it missed nothing, they agree.

  Three adjacent MoE layers, a cache of k slots: demand loads are frequent, but not in every step.
  """
  config = tiny_qwen2_moe_config()
  build_hf_model(config, tmp_path, seed=11)
  model = moejax.load(tmp_path, experts="host")
  monkeypatch.setattr(engine_lib, "StagedOps", _RecordingOps)
  _RecordingOps.log = []
  Engine(model, policy="+pre", alpha=0.0, cache_slots=TOP_K, profile=True).generate(PROMPTS[:1], 12)
  log = _RecordingOps.log
  compared = {True: 0, False: 0}
  missed = None
  for i, (kind, layer, value) in enumerate(log):
    if kind == "missed":
      missed = value > 0
    if kind == "predicted":
      real = next(v for k, l, v in log[i::-1] if k == "scores" and l == layer)
      same = np.allclose(value, real, atol=1e-6)
      assert same != missed, (layer, missed)
      compared[missed] += 1
  assert compared[True] > 0 and compared[False] > 0, compared  # both cases occurred


def test_prefetch_accuracy_is_below_one_on_the_shipped_model():
  path = moejax.default_model_path()
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  ids = np.asarray(tokenizer(HELDOUT.read_text()[:4000])["input_ids"][:96], np.int32)
  model = moejax.load(path, dtype="float32", experts="host")
  stats = (
    Engine(model, policy="+pre", alpha=0.3, cache_fraction=0.25)
    .generate(ids[None, :16], 80, forced_tokens=ids[None, 16:])
    .stats
  )
  assert stats["prefetch_loads"] > 0
  assert 0.5 < stats["prefetch_accuracy_selected"] < 1
  assert stats["prefetch_accuracy_top"] < 1
  assert stats["hit_ratio"] > stats["cache_hit_ratio"]  # prefetch hits are hits, not cache hits


def test_cache_hit_ratio_counts_only_resident_experts(host_model):
  lru = Engine(host_model, policy="lru", cache_slots=TOP_K + 1).generate(PROMPTS, 5, MASK).stats
  assert lru["cache_hit_ratio"] == lru["hit_ratio"]  # no prefetch: every hit was resident
  assert float(jnp.asarray(lru["pair_classes"]["prefetch"])) == 0
