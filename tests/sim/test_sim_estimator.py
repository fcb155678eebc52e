"""The pipeline estimator against pipelines computed by hand.

Toy profile (round numbers, no latencies, no launch overhead):
  gpu_mem_bw = 1e9 B/s, link_bw = 1e8 B/s, cpu_mem_bw = 1e8 B/s, FLOP rates
  huge (memory-bound) unless a test says otherwise.
With dense_bytes = expert_bytes = head_bytes = 1e6 B (= 1 MB):
  attention of a layer  = 1e6 / 1e9 = 1 ms on the GPU
  one expert on the GPU = 1 ms;  one expert copy = 1e6 / 1e8 = 10 ms;
  one expert on the CPU = 1e6 / 1e8 = 10 ms;  head = 1 ms.
All times below are in milliseconds.
"""

import dataclasses
import json

import pytest

from moejax.sim import (PROFILES, HardwareProfile, LayerEvent, StepTrace, estimate_tpot,
                        get_profile, summarize)

MB = 10**6
ms = 1e-3

TOY = HardwareProfile(
    name="toy", gpu_mem_bw=1e9, gpu_flops=1e18, gpu_memory=1 << 34, link_bw=1e8,
    link_latency_s=0.0, cpu_mem_bw=1e8, cpu_flops=1e18, cpu_cores=1, kernel_overhead_s=0.0,
    sources={},
)


def ev(layer, **kw):
  kw = dict(tokens=1, dense_bytes=MB, expert_bytes=MB) | kw
  return LayerEvent(layer=layer, **kw)


def step(*layers, kind="decode", tokens=1, step_idx=0, hidden_size=0, dtype_bytes=2, head_bytes=MB):
  return StepTrace(step=step_idx, tokens=tokens, kind=kind, layers=tuple(layers),
                   head_bytes=head_bytes, wall_s=0.123, dtype_bytes=dtype_bytes,
                   hidden_size=hidden_size)


def one(*layers, profile=TOY, **kw):
  """Estimate a single decode step; return (step estimate, estimate)."""
  est = estimate_tpot([step(*layers, **kw)], profile)
  return est.steps[0], est


def check_invariants(st):
  t = 0.0
  for lt in st.layers:
    assert lt.start == pytest.approx(t)
    assert lt.time_s == pytest.approx(lt.gpu_s + lt.stall_s)
    assert lt.copy_stall_s >= -1e-15 and lt.cpu_wait_s >= -1e-15
    t = lt.end
  assert st.head.start == pytest.approx(t)
  assert st.time_s == pytest.approx(st.head.end)


def test_all_hits_is_pure_memory_bound_time():
  # Per layer: attention 1 + 2 experts = 3 ms; two layers 6 ms; head 1 ms -> 7 ms.
  st, est = one(ev(0, hits=2), ev(1, hits=2))
  assert est.tpot_s == pytest.approx(7 * ms)
  assert st.stall_s == 0 and st.link_s == 0 and st.cpu_s == 0
  assert st.gpu_s == pytest.approx(7 * ms)
  assert est.label == "estimate" and est.ttft_s is None
  assert est.decode_tokens_per_s == pytest.approx(1 / (7 * ms))
  check_invariants(st)


def test_demand_load_adds_exactly_its_copy_as_stall():
  # attention 0-1; plan at 1; demand copy 1-11; experts (1 hit + 1 demand) 11-13; head 13-14.
  st, est = one(ev(0, hits=1, demand_loads=1))
  lt = st.layers[0]
  assert lt.demand_copy == pytest.approx((1 * ms, 11 * ms))
  assert lt.experts == pytest.approx((11 * ms, 13 * ms))
  assert lt.copy_stall_s == pytest.approx(10 * ms)
  assert est.tpot_s == pytest.approx(14 * ms)
  # Same experts all resident: 1 + 2 + 1 = 4 ms; the difference is the 10 ms copy.
  base = one(ev(0, hits=2))[1].tpot_s
  assert est.tpot_s - base == pytest.approx(10 * ms)
  check_invariants(st)


def test_fully_hidden_prefetch_costs_nothing():
  # Layer 0: attention 0-1, 20 resident experts 1-21. The prefetch for layer 1
  # is issued when layer 0's attention ends (1) and copies 1-11 < 21: hidden.
  # Layer 1: attention 21-22, experts (1 hit + 1 prefetched) 22-24; head 24-25.
  st, est = one(ev(0, hits=20), ev(1, hits=1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[1].prefetch_copy == pytest.approx((1 * ms, 11 * ms))
  assert st.layers[1].prefetch_copy.start == pytest.approx(st.layers[0].attention.end)
  assert st.layers[1].copy_stall_s == 0
  assert est.tpot_s == pytest.approx(25 * ms)
  assert est.tpot_s == pytest.approx(one(ev(0, hits=20), ev(1, hits=2))[1].tpot_s)
  check_invariants(st)


def test_partially_hidden_prefetch_costs_the_remainder():
  # Layer 0: attention 0-1, 5 experts 1-6; prefetch for layer 1 copies 1-11.
  # Layer 1: attention 6-7, experts wait for the prefetch: 11-13; head 13-14.
  # Hidden: 5 ms (layer 0 experts) + 1 ms (layer 1 attention) = 6 ms of the
  # 10 ms copy, so the stall is the remaining 4 ms.
  st, est = one(ev(0, hits=5), ev(1, hits=1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[1].copy_stall_s == pytest.approx(4 * ms)
  assert est.tpot_s == pytest.approx(14 * ms)
  no_copy = one(ev(0, hits=5), ev(1, hits=2))[1].tpot_s  # 1+5+1+2+1 = 10 ms
  assert est.tpot_s - no_copy == pytest.approx(4 * ms)
  # The same expert as a demand load instead: copy 7-17, experts 17-19, head 19-20.
  assert one(ev(0, hits=5), ev(1, hits=1, demand_loads=1))[1].tpot_s == pytest.approx(20 * ms)
  check_invariants(st)


def test_unused_prefetch_occupies_the_link():
  # Prefetch for layer 1 copies 1-11 but is not used. Layer 1: attention 6-7,
  # its demand copy is issued at 7 but queues behind the prefetch: 11-21;
  # experts (1 hit + 1 demand) 21-23; head 23-24. Stall 14 ms.
  st, est = one(ev(0, hits=5), ev(1, hits=1, demand_loads=1, prefetch_loads=1, prefetch_used=0))
  lt = st.layers[1]
  assert lt.demand_copy == pytest.approx((11 * ms, 21 * ms))
  assert lt.copy_stall_s == pytest.approx(14 * ms)
  assert est.tpot_s == pytest.approx(24 * ms)
  assert lt.link_s == pytest.approx(20 * ms)  # the unused prefetch is charged to layer 1
  check_invariants(st)


def test_unused_prefetch_alone_does_not_delay_compute():
  # Layer 1 only computes its resident expert; the wasted copy (1-11) runs beside.
  # 1 + 5 + 1 + 1 + 1 = 9 ms.
  st, est = one(ev(0, hits=5), ev(1, hits=1, prefetch_loads=1, prefetch_used=0))
  assert est.tpot_s == pytest.approx(9 * ms)
  assert st.layers[1].copy_stall_s == 0


def test_prefetch_for_layer_zero_is_issued_at_step_start():
  # Copy 0-10; attention 0-1; experts wait 10, run 10-11; head 11-12.
  st, est = one(ev(0, prefetch_loads=1, prefetch_used=1))
  assert st.layers[0].prefetch_copy == pytest.approx((0, 10 * ms))
  assert est.tpot_s == pytest.approx(12 * ms)


def test_predictor_runs_before_the_prefetch_is_issued():
  # Layer 0: attention 0-1, predictor (1 MB) 1-2, prefetch for layer 1 issued
  # at 2: copy 2-12; experts of layer 0 (3 hits) 2-5. Layer 1: attention 5-6,
  # experts wait for 12: 12-13; head 13-14.
  st, est = one(ev(0, hits=3, predictor_bytes=MB), ev(1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[0].predictor == pytest.approx((1 * ms, 2 * ms))
  assert st.layers[1].prefetch_copy == pytest.approx((2 * ms, 12 * ms))
  assert est.tpot_s == pytest.approx(14 * ms)
  check_invariants(st)


def test_cpu_work_overlapping_copies_takes_the_max_not_the_sum():
  # Plan at 1. Link: demand copy 1-11, experts (1 hit + 1 demand) 11-13.
  # CPU: 2 experts x 10 ms = 1-21. Layer ends at max(13, 21) = 21; head 21-22.
  # Serial sum would be 1 + 10 + 2 + 20 + 1 = 34 ms.
  st, est = one(ev(0, hits=1, demand_loads=1, cpu_experts=2))
  lt = st.layers[0]
  assert lt.cpu == pytest.approx((1 * ms, 21 * ms))
  assert lt.cpu.start < lt.demand_copy.end and lt.demand_copy.start < lt.cpu.end  # overlap
  assert lt.cpu.start < lt.experts.end and lt.experts.start < lt.cpu.end
  assert est.tpot_s == pytest.approx(22 * ms)
  assert lt.copy_stall_s == pytest.approx(10 * ms) and lt.cpu_wait_s == pytest.approx(8 * ms)
  # The other way round: CPU 1 expert (1-11) hides inside 2 demand copies (1-21);
  # experts (1 hit + 2 demand) 21-24; head 24-25.
  st2, est2 = one(ev(0, hits=1, demand_loads=2, cpu_experts=1))
  assert est2.tpot_s == pytest.approx(25 * ms)
  assert st2.layers[0].cpu_wait_s == 0
  check_invariants(st)
  check_invariants(st2)


def test_cpu_activation_transfers():
  # hidden 1000, 1 token, float32 -> 4000 B each way = 4000 / 1e8 = 0.04 ms.
  # Plan at 1; activations down 1-1.04; CPU 1.04-11.04; result up 11.04-11.08.
  # GPU expert (1 hit) 1-2. Layer ends 11.08; head 11.08-12.08.
  st, est = one(ev(0, hits=1, cpu_experts=1), hidden_size=1000, dtype_bytes=4)
  lt = st.layers[0]
  assert lt.cpu_input == pytest.approx((1 * ms, 1.04 * ms))
  assert lt.cpu == pytest.approx((1.04 * ms, 11.04 * ms))
  assert lt.cpu_output == pytest.approx((11.04 * ms, 11.08 * ms))
  assert est.tpot_s == pytest.approx(12.08 * ms)
  check_invariants(st)


def test_cpu_result_queues_behind_host_to_device_copies():
  # Demand copy of 2 experts 1-21. CPU result ready at 11.04 but the link is
  # busy until 21: result copy 21-21.04. Experts (2 demand) 21-23; layer ends
  # 23; head 23-24.
  st, est = one(ev(0, demand_loads=2, cpu_experts=1), hidden_size=1000, dtype_bytes=4)
  lt = st.layers[0]
  assert lt.cpu_output == pytest.approx((21 * ms, 21.04 * ms))
  assert est.tpot_s == pytest.approx(24 * ms)


def test_layerwise_streaming_one_layer_ahead():
  # Each layer streams 4 experts (40 ms) and computes 2 of them (counted as hits).
  # Link: layer 0's batch at t=0: 0-40; layer 1's issued when layer 0 starts (0),
  # queued: 40-80; layer 2's issued when layer 1 starts (42): 80-120.
  # GPU: L0 attention 0-1, experts 40-42; L1 attention 42-43, experts 80-82;
  # L2 attention 82-83, experts 120-122; head 122-123.
  layers = [ev(i, hits=2, layerwise_loads=4) for i in range(3)]
  st, est = one(*layers)
  assert [lt.layerwise_copy for lt in st.layers] == [
      pytest.approx((0, 40 * ms)), pytest.approx((40 * ms, 80 * ms)), pytest.approx((80 * ms, 120 * ms))]
  assert [lt.experts.start for lt in st.layers] == pytest.approx([40 * ms, 80 * ms, 120 * ms])
  assert est.tpot_s == pytest.approx(123 * ms)
  assert st.link_s == pytest.approx(120 * ms)
  check_invariants(st)


def test_latency_and_kernel_overhead():
  # link latency 1 ms per batch, kernel overhead 0.5 ms per layer and for the head.
  # Attention 0-1.5; demand copy 1.5 + (1 + 10) = 1.5-12.5; experts 12.5-13.5;
  # head 13.5-15.
  prof = dataclasses.replace(TOY, link_latency_s=1 * ms, kernel_overhead_s=0.5 * ms)
  st, est = one(ev(0, demand_loads=1), profile=prof)
  assert st.layers[0].demand_copy == pytest.approx((1.5 * ms, 12.5 * ms))
  assert est.tpot_s == pytest.approx(15 * ms)


def test_compute_bound_prefill_and_token_expert_pairs():
  # gpu_flops = 1e10. 100 tokens, bf16 (2 B): a 1 MB block is 5e5 params,
  # 2 * 100 * 5e5 = 1e8 FLOP = 10 ms (> 1 ms to read it): compute-bound.
  # Attention 10 ms; 4 experts assumed to see all 100 tokens: 4e8 FLOP = 40 ms;
  # head 10 ms. TTFT = 60 ms. With gpu_pairs = 200 (top-2): 2e8 FLOP = 20 ms
  # -> TTFT = 40 ms.
  prof = dataclasses.replace(TOY, gpu_flops=1e10)
  kw = dict(kind="prefill", tokens=100)
  est = estimate_tpot([step(ev(0, tokens=100, hits=4), **kw)], prof)
  assert est.ttft_s == pytest.approx(60 * ms) and est.tpot_s is None
  est = estimate_tpot([step(ev(0, tokens=100, hits=4, gpu_pairs=200), **kw)], prof)
  assert est.ttft_s == pytest.approx(40 * ms)
  # CPU compute-bound: cpu_flops 1e10, 1 expert with cpu_pairs = 100 -> 2*100*5e5/1e10 = 10 ms
  # (= its 10 ms read time); with 50 pairs it stays memory-bound at 10 ms; with
  # 300 tokens all routed (pairs unknown): 30 ms.
  prof = dataclasses.replace(TOY, cpu_flops=1e10)
  est = estimate_tpot([step(ev(0, tokens=300, cpu_experts=1), kind="prefill", tokens=300)], prof)
  assert est.steps[0].layers[0].cpu.duration == pytest.approx(30 * ms)
  est = estimate_tpot([step(ev(0, tokens=300, cpu_experts=1, cpu_pairs=50), kind="prefill",
                            tokens=300)], prof)
  assert est.steps[0].layers[0].cpu.duration == pytest.approx(10 * ms)


def test_target_dtype_rescales_weight_bytes():
  # The run recorded float32 bytes (dtype 4); on the target the weights are fp16:
  # every byte count halves. All hits: (1 + 2) * 2 + 1 = 7 ms -> 3.5 ms.
  trace = [step(ev(0, hits=2), ev(1, hits=2), dtype_bytes=4)]
  assert estimate_tpot(trace, TOY).tpot_s == pytest.approx(7 * ms)
  assert estimate_tpot(trace, TOY, target_dtype_bytes=2).tpot_s == pytest.approx(3.5 * ms)
  # Demand copy halves too: 1 + 10 + 2 + 1 = 14 ms -> 0.5 + 5 + 1 + 0.5 = 7 ms.
  trace = [step(ev(0, hits=1, demand_loads=1), dtype_bytes=4)]
  assert estimate_tpot(trace, TOY, target_dtype_bytes=2).tpot_s == pytest.approx(7 * ms)
  # dtype_bytes overrides the trace's own (affects FLOPs only, here memory-bound).
  assert estimate_tpot(trace, TOY, dtype_bytes=2).tpot_s == pytest.approx(14 * ms)
  with pytest.raises(ValueError, match="target_dtype_bytes"):
    estimate_tpot(trace, TOY, target_dtype_bytes=0)


def test_dense_layer_and_empty_expert_phase():
  # Dense layer (expert_bytes = 0): attention only, 1 ms; head 1 ms.
  st, est = one(ev(0, expert_bytes=0))
  assert est.tpot_s == pytest.approx(2 * ms)
  assert st.layers[0].experts.duration == 0


def test_tpot_is_mean_of_decode_steps_and_ttft_mean_of_prefills():
  # Prefill A in two chunks (3 ms each, 1 layer with 1 hit + head), decode 3 ms
  # and 14 ms, prefill B one chunk of 3 ms, decode 3 ms.
  # TTFT = mean(6, 3) = 4.5 ms; TPOT = mean(3, 14, 3) = 20/3 ms.
  fast, slow = ev(0, hits=1), ev(0, hits=1, demand_loads=1)
  trace = [step(fast, kind="prefill", step_idx=0), step(fast, kind="prefill", step_idx=1),
           step(fast, step_idx=2), step(slow, step_idx=3),
           step(fast, kind="prefill", step_idx=4), step(fast, step_idx=5)]
  est = estimate_tpot(trace, TOY)
  assert est.ttft_s == pytest.approx(4.5 * ms)
  assert est.tpot_s == pytest.approx(20 / 3 * ms)
  rows = est.layer_breakdown("decode")
  assert len(rows) == 1 and rows[0]["steps"] == 3
  assert rows[0]["stall_s"] == pytest.approx(10 / 3 * ms)


def test_summary_is_json_and_labelled():
  trace = [step(ev(0, hits=1, demand_loads=1, cpu_experts=1, measured={"copy": 0.5}),
                ev(1, prefetch_loads=2, prefetch_used=1), hidden_size=8)]
  est = estimate_tpot(trace, "rtx3080ti_12gb")
  assert est.label == "estimate" and est.profile == "rtx3080ti_12gb"
  with pytest.raises(TypeError):
    type(est)(profile="x", tpot_s=1.0, ttft_s=None, decode_tokens_per_s=None, steps=(),
              dtype_bytes=None, target_dtype_bytes=None, hardware=TOY, label="measured")
  s = summarize(est, timelines=True)
  assert s["label"] == "estimate"
  assert s["profile_spec"]["sources"]["gpu_mem_bw"].startswith("vendor")
  assert s["steps"][0]["measured"] == {"copy": 0.5}
  assert s["steps"][0]["wall_s"] == 0.123
  assert s["steps"][0]["layers"][0]["demand_copy"][1] > s["steps"][0]["layers"][0]["demand_copy"][0]
  json.loads(json.dumps(s))
  assert json.loads(json.dumps(summarize(est)))["tpot_s"] == pytest.approx(est.tpot_s)
  check_invariants(est.steps[0])


def test_unknown_profile_name():
  with pytest.raises(ValueError, match="rtx3080ti_12gb"):
    estimate_tpot([step(ev(0))], "gtx480")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_real_profiles_order_offload_costs_sensibly(name):
  # A Qwen1.5-MoE-like decode layer in fp16: ~50 MB dense, 8.6 MB experts, top-4.
  prof = get_profile(name)
  layer = dict(tokens=1, dense_bytes=50 * MB, expert_bytes=8_650_752)
  resident = [step(*[ev(i, hits=4, **layer) for i in range(24)], hidden_size=2048)]
  missing = [step(*[ev(i, hits=2, demand_loads=2, **layer) for i in range(24)], hidden_size=2048)]
  on_cpu = [step(*[ev(i, hits=2, cpu_experts=2, **layer) for i in range(24)], hidden_size=2048)]
  t_res, t_miss, t_cpu = (estimate_tpot(t, prof).tpot_s for t in (resident, missing, on_cpu))
  # Memory-bound floor: bytes / bandwidth.
  floor = (24 * (50 * MB + 4 * 8_650_752) + MB) / prof.gpu_mem_bw
  assert t_res >= floor and t_res < 1.5 * floor + 24 * prof.kernel_overhead_s
  assert t_miss > t_res and t_cpu > t_res
  check_invariants(estimate_tpot(on_cpu, prof).steps[0])


def test_command_line_reestimates_a_saved_trace(tmp_path):
  from moejax.sim import save_trace
  from moejax.sim.__main__ import main

  path = tmp_path / "trace.json"
  save_trace(path, [step(ev(0, hits=1, demand_loads=1), dtype_bytes=4)])
  out = tmp_path / "est.json"
  assert main([str(path), "--profile", "h200", "--profile", "a6000_48gb",
               "--target_dtype_bytes", "2", "--out", str(out)]) == 0
  doc = json.loads(out.read_text())
  assert doc["label"] == "estimate" and set(doc["estimates"]) == {"h200", "a6000_48gb"}
  assert all(e["label"] == "estimate" and e["tpot_s"] > 0 for e in doc["estimates"].values())
