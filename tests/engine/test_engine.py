"""Engine: lossless offloading, real offloading, statistics, validation."""

import collections
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import moejax
from moejax.engine import Engine
from moejax.scheduling import POLICIES
from tests.engine.conftest import NUM_EXPERTS, TOP_K

PROMPTS = np.random.RandomState(0).randint(0, 61, (3, 7))
MASK = np.ones_like(PROMPTS)
MASK[1, :3] = 0  # prompts of different lengths (left padded)
MASK[2, :5] = 0
NEW = 6


@pytest.fixture(scope="module")
def reference(resident_model):
  """Tokens and per-token log-probs of the fully resident model."""
  out = {}
  for b in (1, 3):
    tokens = resident_model.generate(PROMPTS[:b], NEW, MASK[:b])
    logits = np.asarray(resident_model.forward(tokens, np.concatenate([MASK[:b], np.ones((b, NEW), int)], 1)))
    logp = jax.nn.log_softmax(logits, -1)
    t = PROMPTS.shape[1]
    chosen = np.take_along_axis(np.asarray(logp[:, t - 1 : -1]), tokens[:, t:, None], -1)[..., 0]
    out[b] = tokens, chosen
  return out


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("slots", [TOP_K, NUM_EXPERTS // 2, NUM_EXPERTS])
def test_alpha_zero_is_lossless(host_model, reference, policy, slots):
  """alpha = 0: every policy and cache budget gives the resident model's tokens and log-probs."""
  engine = Engine(host_model, policy=policy, alpha=0.0, cache_slots=slots)
  for b in (1, 3):
    tokens, logp = reference[b]
    result = engine.generate(PROMPTS[:b], NEW, MASK[:b])
    np.testing.assert_array_equal(result.tokens, tokens)
    np.testing.assert_allclose(result.logprobs, logp, atol=2e-4)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_alpha_zero_is_lossless_in_a_shared_pool(host_model, reference, policy):
  """One pool of k slots for every MoE layer (cache_scope "global"): still the resident model's tokens."""
  engine = Engine(host_model, policy=policy, alpha=0.0, cache_slots=TOP_K, cache_scope="global")
  tokens, logp = reference[3]
  result = engine.generate(PROMPTS, NEW, MASK)
  np.testing.assert_array_equal(result.tokens, tokens)
  np.testing.assert_allclose(result.logprobs, logp, atol=2e-4)


_MEMORY_PROBE = """
import json, sys
import jax, numpy as np
import moejax
from moejax.engine import Engine

def device_expert_bytes(c):
  shapes = ((c.hidden_size, c.moe_intermediate_size), (c.moe_intermediate_size, c.hidden_size))
  return sum(a.nbytes for a in jax.live_arrays()
             if a.ndim == 3 and a.shape[1:] in shapes and a.sharding.memory_kind in (None, "device"))

path, slots, placement = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = moejax.load(path, experts=placement)
engine = Engine(model, policy="lru" if placement == "host" else "resident", cache_slots=slots)
engine.generate(np.arange(7)[None] % 61, 3)
print(json.dumps({"bytes": device_expert_bytes(model.config)}))
"""


def _device_expert_bytes(path, slots, placement):
  """Routed-expert bytes in device memory after a short decode, measured in a fresh process."""
  out = subprocess.run(
    [sys.executable, "-c", _MEMORY_PROBE, str(path), str(slots), placement], capture_output=True, text=True, check=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def test_offloading_is_real(tiny_path, host_model):
  """With cache_slots = k, device memory holds no more routed-expert bytes than the k slots per layer."""
  c = host_model.config
  expert_bytes = c.expert_param_count() * 4
  n_moe = len(c.moe_layer_ids)
  assert _device_expert_bytes(tiny_path, TOP_K, "host") <= n_moe * TOP_K * expert_bytes
  # The probe can see experts: a resident model holds all of them on the device.
  assert _device_expert_bytes(tiny_path, NUM_EXPERTS, "device") >= n_moe * NUM_EXPERTS * expert_bytes


def test_full_cache_is_all_hits_after_warmup(host_model):
  engine = Engine(host_model, policy="lru", cache_slots=NUM_EXPERTS)
  result = engine.generate(PROMPTS[:1], 20)
  per_layer = result.stats["per_layer"]
  # Each expert is loaded at most once per layer, after which every step hits.
  assert all(n <= NUM_EXPERTS for n in per_layer["demand_loads"])
  last = result.trace[-5:]
  assert all(ev.demand_loads == 0 and ev.cpu_experts == 0 for step in last for ev in step.layers)
  assert result.stats["cpu_experts"] == 0


def _brute_force_lru(steps, slots, resident, last_used, first_step):
  """Plain-Python LRU replay: evict the least recently used expert not needed now (ties: lowest id).

  Returns (token-expert pairs that hit, experts loaded).
  """
  resident, last_used = set(resident), dict(last_used)
  pair_hits = loads = 0
  for t, experts in enumerate(steps):
    flat = experts.ravel().tolist()
    needed = set(flat)
    pair_hits += sum(e in resident for e in flat)
    for e in sorted(needed - resident):
      loads += 1
      if len(resident) >= slots:
        victim = min(resident - needed, key=lambda v: (last_used.get(v, -1), v))
        resident.remove(victim)
      resident.add(e)
    for e in needed:
      last_used[e] = first_step + t
  return pair_hits, loads


def test_lru_counts_match_brute_force(host_model):
  """Hits, loads and bytes of lru equal a plain-Python LRU replay of the same routing."""
  slots, new = 4, 16
  c = host_model.config
  # The cache as the exact prefill leaves it: read from an engine that ran the prefill only.
  probe = Engine(host_model, policy="lru", cache_slots=slots)
  probe.generate(PROMPTS[:1], 1)
  engine = Engine(host_model, policy="lru", cache_slots=slots, record_routing=True)
  result = engine.generate(PROMPTS[:1], new)
  expert_bytes = c.expert_param_count() * 4
  per_layer = result.stats["per_layer"]
  for layer in c.moe_layer_ids:
    state = probe.states[layer]
    resident = [int(e) for e in np.asarray(state.slot_expert) if e >= 0]
    last_used = {e: int(np.asarray(state.last_used)[e]) for e in range(NUM_EXPERTS)}
    steps = [r[layer].experts for r in result.routing[1:]]
    assert len(steps) == new - 1
    hits, loads = _brute_force_lru(steps, slots, resident, last_used, int(np.asarray(state.step)))
    assert per_layer["pairs_resident"][layer] + per_layer["pairs_prefetch"][layer] == hits
    assert per_layer["demand_loads"][layer] == loads
    assert per_layer["bytes_to_device"][layer] == loads * expert_bytes
    assert per_layer["pairs"][layer] == (new - 1) * TOP_K


def _brute_force_shared_lru(steps, slots, resident, last_used, clock):
  """Plain-Python LRU over one pool shared by the MoE layers; steps: per decode step, per MoE layer in order, the
  keys `layer_index * E + expert` it computes. The clock ticks once per layer step; evict the least recently used
  key (ties: lowest key) that the layer does not compute. Returns (pair hits, loads) per MoE layer index."""
  resident, last_used = set(resident), dict(last_used)
  hits, loads = collections.Counter(), collections.Counter()
  for step in steps:
    for j, keys in enumerate(step):
      needed = set(keys)
      hits[j] += sum(key in resident for key in keys)
      for key in sorted(needed - resident):
        loads[j] += 1
        if len(resident) >= slots:
          resident.remove(min(resident - needed, key=lambda v: (last_used.get(v, -1), v)))
        resident.add(key)
        last_used[key] = clock
      for key in needed:
        last_used[key] = clock
      clock += 1
  return hits, loads


def test_shared_pool_lru_counts_match_brute_force(host_model):
  """lru with one pool for every MoE layer: hits and loads per layer equal a plain-Python replay of the routing."""
  slots, new = 5, 16
  c = host_model.config
  probe = Engine(host_model, policy="lru", cache_slots=slots, cache_scope="global")
  probe.generate(PROMPTS[:1], 1)  # the pool as the exact prefill leaves it
  table = probe.states[c.moe_layer_ids[0]]
  resident = [int(k) for k in np.asarray(table.slot_expert) if k >= 0]
  last_used = {k: int(v) for k, v in enumerate(np.asarray(table.last_used))}
  engine = Engine(host_model, policy="lru", cache_slots=slots, cache_scope="global", record_routing=True)
  result = engine.generate(PROMPTS[:1], new)
  steps = [
    [(j * NUM_EXPERTS + r[l].experts).ravel().tolist() for j, l in enumerate(c.moe_layer_ids)]
    for r in result.routing[1:]
  ]
  hits, loads = _brute_force_shared_lru(steps, slots, resident, last_used, int(np.asarray(table.step)))
  per_layer = result.stats["per_layer"]
  for j, l in enumerate(c.moe_layer_ids):
    assert per_layer["pairs_resident"][l] == hits[j]
    assert per_layer["demand_loads"][l] == loads[j]
  assert sum(loads.values()) > 0 and sum(hits.values()) > 0


def test_release_prefetches_one_expert_only_after_a_miss(host_model):
  """smoe_release: the prefetch for a layer copies at most one expert, and only when the layer before missed."""
  engine = Engine(host_model, policy="smoe_release", cache_slots=TOP_K + 2, costs="0.002,0.001")
  result = engine.generate(PROMPTS, 12, MASK)
  first, second = host_model.config.moe_layer_ids[:2]
  prefetched = 0
  for step in result.trace:
    if step.kind != "decode":
      continue
    events = {ev.layer: ev for ev in step.layers}
    before, after = events[first], events[second]
    assert after.prefetch_loads <= 1
    if before.demand_loads + before.cpu_experts == 0:
      assert after.prefetch_loads == 0
    prefetched += after.prefetch_loads
  assert prefetched > 0


def test_validation_errors(host_model, tiny_path, tmp_path):
  with pytest.raises(ValueError, match="alpha must be >= 0"):
    Engine(host_model, policy="smoe", alpha=-0.1)
  with pytest.raises(ValueError, match="unknown policy"):
    Engine(host_model, policy="fastest")
  with pytest.raises(ValueError, match="below top-k"):
    Engine(host_model, policy="lru", cache_slots=TOP_K - 1)
  Engine(host_model, policy="smoe", cache_slots=TOP_K - 1)  # CPU compute covers a budget below k

  from tests.models.hf_utils import build_hf_model, tiny_qwen2_moe_config

  dense = tiny_qwen2_moe_config(num_hidden_layers=2, num_experts=4, mlp_only_layers=[0, 1])
  build_hf_model(dense, tmp_path / "dense")
  with pytest.raises(ValueError, match="no MoE layers"):
    Engine(moejax.load(tmp_path / "dense"), policy="lru")


def test_sampling_is_seeded(host_model):
  engine = Engine(host_model, policy="resident")
  a = engine.generate(PROMPTS[:2], 8, temperature=1.0, top_p=0.9, seed=1).tokens
  b = engine.generate(PROMPTS[:2], 8, temperature=1.0, top_p=0.9, seed=1).tokens
  c = engine.generate(PROMPTS[:2], 8, temperature=1.0, top_p=0.9, seed=2).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_forced_tokens_score_the_decode_path(host_model, reference):
  tokens, logp = reference[3]
  t = PROMPTS.shape[1]
  result = Engine(host_model, policy="smoe", cache_slots=TOP_K).generate(
    PROMPTS, NEW, MASK, forced_tokens=tokens[:, t:]
  )
  np.testing.assert_allclose(result.logprobs, logp, atol=2e-4)
  assert result.greedy.all()


@pytest.mark.parametrize("policy", ["+pre", "lfu", "cpu"])
def test_profile_mode_runs_the_same_step(host_model, policy):
  """Stage by stage (host decisions between jitted stages) equals the fused step (in-graph conds and copies)."""
  runs = []
  for profile in (False, True):
    engine = Engine(host_model, policy=policy, alpha=0.3, cache_slots=TOP_K, profile=profile)
    runs.append(engine.generate(PROMPTS, NEW, MASK))
  fused, staged = runs
  np.testing.assert_array_equal(staged.tokens, fused.tokens)
  np.testing.assert_allclose(staged.logprobs, fused.logprobs, atol=1e-5)
  assert staged.stats["per_layer"] == fused.stats["per_layer"]
  assert fused.stats["cpu_pairs"] > 0  # batch 3 at k slots: some pairs always run on the host
  assert {"attention", "plan", "experts", "head"} <= set(staged.stats["times_s"])
  assert ("cpu" if policy == "cpu" else "copy") in staged.stats["times_s"]
  assert fused.stats["times_s"] == {}  # the fused step times nothing inside itself


def test_balance_costs_are_measured_once_and_kept(host_model):
  engine = Engine(host_model, policy="smoe", alpha=0.3, cache_slots=TOP_K)
  assert engine.calibrated_costs is None
  engine.generate(PROMPTS[:1], 2)
  costs = engine.calibrated_costs
  assert float(costs.n_load) == TOP_K and float(costs.n_cpu) == TOP_K
  assert 0 < float(costs.load_s) < 1e-3 and 0 < float(costs.cpu_s) < 1e-3  # measured, not the 1 ms priors
  engine.reset()
  assert engine.costs is costs


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_device_decode_loop_equals_host_driven_steps(host_model, temperature):
  """`generate` as one program equals the host stepping the same fused step (a stop callback that never stops)."""
  engine = Engine(host_model, policy="smoe", alpha=0.3, cache_slots=TOP_K)
  runs = []
  for stop in (None, lambda tokens: False):
    engine.reset()  # measured balance costs are kept: both runs split loads and CPU work alike
    runs.append(engine.generate(PROMPTS, NEW, MASK, temperature=temperature, seed=3, stop=stop))
  on_device, stepped = runs
  np.testing.assert_array_equal(on_device.tokens, stepped.tokens)
  np.testing.assert_allclose(on_device.logprobs, stepped.logprobs, atol=1e-5)
  assert on_device.stats["per_layer"] == stepped.stats["per_layer"]
  assert [len(t.layers) for t in on_device.trace] == [len(t.layers) for t in stepped.trace]


def test_device_decode_makes_no_hidden_transfers(host_model):
  """After compiling, a whole `generate` on the device path moves data only by explicit device_put / device_get."""
  engine = Engine(host_model, policy="smoe", alpha=0.3, cache_slots=TOP_K, costs="rtx4060ti_16gb")
  expected = engine.generate(PROMPTS, NEW, MASK)
  engine.reset()
  with jax.transfer_guard("disallow"):
    result = engine.generate(PROMPTS, NEW, MASK)
  np.testing.assert_array_equal(result.tokens, expected.tokens)
