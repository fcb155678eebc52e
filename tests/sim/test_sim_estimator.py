"""The pipeline estimator against pipelines computed by hand.

Toy profile (round numbers, no latencies, no launch overhead, a free plan):
  gpu_mem_bw = 1e9 B/s, link_bw = 1e8 B/s, cpu_mem_bw = 1e8 B/s, FLOP rates
  huge (memory-bound) unless a test says otherwise.
With dense_bytes = expert_bytes = head_bytes = 1e6 B (= 1 MB):
  attention of a layer  = 1e6 / 1e9 = 1 ms on the GPU
  one expert on the GPU = 1 ms;  one expert copy = 1e6 / 1e8 = 10 ms;
  one expert on the CPU = 1e6 / 1e8 = 10 ms;  head = 1 ms.
Per MoE layer the GPU runs: attention, plan, resident experts (hits +
prefetch_used), demand-loaded experts; the predictor sits after the plan
("gate") or after the resident experts ("provisional", "layernorm").
All times below are in milliseconds.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from moejax.scheduling import balance
from moejax.sim import PROFILES, HardwareProfile, LayerEvent, StepTrace, estimate_tpot, get_profile, summarize
from moejax.sim.estimator import split_misses
from moejax.sim.profiles import expert_costs

MB = 10**6
ms = 1e-3
engine_split = jax.jit(balance.split_load_cpu)

TOY = HardwareProfile(
  name="toy",
  gpu_mem_bw=1e9,
  gpu_flops=1e18,
  gpu_memory=1 << 34,
  link_bw=1e8,
  link_latency_s=0.0,
  cpu_mem_bw=1e8,
  cpu_flops=1e18,
  cpu_cores=1,
  kernel_overhead_s=0.0,
  plan_s=0.0,
  sources={},
)


def ev(layer, **kw):
  kw = {"tokens": 1, "dense_bytes": MB, "expert_bytes": MB} | kw
  return LayerEvent(layer=layer, **kw)


def step(*layers, kind="decode", tokens=1, step_idx=0, hidden_size=0, dtype_bytes=2, head_bytes=MB):
  return StepTrace(
    step=step_idx,
    tokens=tokens,
    kind=kind,
    layers=tuple(layers),
    head_bytes=head_bytes,
    wall_s=0.123,
    dtype_bytes=dtype_bytes,
    hidden_size=hidden_size,
  )


def one(*layers, profile=TOY, resplit=True, **kw):
  """Estimate a single decode step; return (step estimate, estimate)."""
  est = estimate_tpot([step(*layers, **kw)], profile, resplit=resplit)
  check_invariants(est.steps[0])
  return est.steps[0], est


def check_invariants(st):
  t = 0.0
  for lt in st.layers:
    assert lt.start == pytest.approx(t)
    assert lt.time_s == pytest.approx(lt.gpu_s + lt.stall_s)
    assert lt.copy_stall_s >= -1e-15 and lt.cpu_wait_s >= -1e-15
    assert lt.experts == (lt.resident_experts.start, lt.demand_experts.end)
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


def test_resident_experts_run_while_the_demand_copy_is_in_flight():
  # attention 0-1; plan at 1; demand copy 1-11; the resident expert runs 1-2;
  # the demand-loaded one waits for the copy: 11-12; head 12-13.
  st, est = one(ev(0, hits=1, demand_loads=1))
  lt = st.layers[0]
  assert lt.demand_copy == pytest.approx((1 * ms, 11 * ms))
  assert lt.resident_experts == pytest.approx((1 * ms, 2 * ms))
  assert lt.demand_experts == pytest.approx((11 * ms, 12 * ms))
  assert lt.copy_stall_s == pytest.approx(9 * ms)
  assert est.tpot_s == pytest.approx(13 * ms)
  # Same experts all resident: 1 + 2 + 1 = 4 ms; the copy costs 10 ms minus the 1 ms hidden under it.
  assert est.tpot_s - one(ev(0, hits=2))[1].tpot_s == pytest.approx(9 * ms)


def test_the_plan_costs_plan_s_per_moe_layer():
  # plan_s = 2 ms. attention 0-1, plan 1-3; demand copy issued at plan end 3-13;
  # resident expert 3-4; demand-loaded expert 13-14; head 14-15.
  prof = dataclasses.replace(TOY, plan_s=2 * ms)
  st, est = one(ev(0, hits=1, demand_loads=1), profile=prof)
  lt = st.layers[0]
  assert lt.plan == pytest.approx((1 * ms, 3 * ms))
  assert lt.demand_copy == pytest.approx((3 * ms, 13 * ms))
  assert est.tpot_s == pytest.approx(15 * ms)
  assert lt.gpu_s == pytest.approx(5 * ms)  # attention 1 + plan 2 + experts 2
  # A dense layer plans nothing: attention 1 + head 1.
  st, est = one(ev(0, expert_bytes=0), profile=prof)
  assert est.tpot_s == pytest.approx(2 * ms) and st.layers[0].plan is None
  # Nor does a layer streamed whole: copy 0-20, attention 0-1, experts 20-22, head 22-23.
  st, est = one(ev(0, hits=2, layerwise_loads=2), profile=prof)
  assert est.tpot_s == pytest.approx(23 * ms) and st.layers[0].plan is None


def test_fully_hidden_prefetch_costs_nothing():
  # "activation" prefetch: no device work, issued at layer 0's plan end (1): copy 1-11.
  # Layer 0: attention 0-1, 20 resident experts 1-21 hide it.
  # Layer 1: attention 21-22, experts (1 hit + 1 prefetched) 22-24; head 24-25.
  st, est = one(ev(0, hits=20, predictor="activation"), ev(1, hits=1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[1].prefetch_copy == pytest.approx((1 * ms, 11 * ms))
  assert st.layers[1].copy_stall_s == 0
  assert est.tpot_s == pytest.approx(25 * ms)
  assert est.tpot_s == pytest.approx(one(ev(0, hits=20), ev(1, hits=2))[1].tpot_s)


def test_partially_hidden_prefetch_costs_the_remainder():
  # Layer 0: attention 0-1, 5 experts 1-6; prefetch for layer 1 copies 1-11.
  # Layer 1: attention 6-7, resident experts wait for the prefetch: 11-13; head 13-14.
  # Hidden: 5 ms (layer 0 experts) + 1 ms (layer 1 attention) of the 10 ms
  # copy, so the stall is the remaining 4 ms.
  st, est = one(ev(0, hits=5, predictor="activation"), ev(1, hits=1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[1].copy_stall_s == pytest.approx(4 * ms)
  assert est.tpot_s == pytest.approx(14 * ms)
  no_copy = one(ev(0, hits=5), ev(1, hits=2))[1].tpot_s  # 1+5+1+2+1 = 10 ms
  assert est.tpot_s - no_copy == pytest.approx(4 * ms)
  # The same expert as a demand load instead: copy 7-17, resident expert 7-8,
  # demand-loaded expert 17-18, head 18-19.
  assert one(ev(0, hits=5), ev(1, hits=1, demand_loads=1))[1].tpot_s == pytest.approx(19 * ms)


def test_unused_prefetch_occupies_the_link():
  # Prefetch for layer 1 copies 1-11 but is not used. Layer 1: attention 6-7,
  # resident expert 7-8 (it waits for no prefetch); the demand copy issued at
  # 7 queues behind the prefetch: 11-21; demand-loaded expert 21-22; head 22-23.
  st, est = one(ev(0, hits=5, predictor="activation"), ev(1, hits=1, demand_loads=1, prefetch_loads=1, prefetch_used=0))
  lt = st.layers[1]
  assert lt.demand_copy == pytest.approx((11 * ms, 21 * ms))
  assert lt.resident_experts == pytest.approx((7 * ms, 8 * ms))
  assert lt.copy_stall_s == pytest.approx(13 * ms)
  assert est.tpot_s == pytest.approx(23 * ms)
  assert lt.link_s == pytest.approx(20 * ms)  # the unused prefetch is charged to layer 1


def test_unused_prefetch_alone_does_not_delay_compute():
  # Layer 1 only computes its resident expert; the wasted copy (1-11) runs beside.
  # 1 + 5 + 1 + 1 + 1 = 9 ms.
  st, est = one(ev(0, hits=5, predictor="activation"), ev(1, hits=1, prefetch_loads=1, prefetch_used=0))
  assert est.tpot_s == pytest.approx(9 * ms)
  assert st.layers[1].copy_stall_s == 0


def test_prefetch_for_the_first_moe_layer_is_issued_at_step_start():
  # Copy 0-10; attention 0-1; experts wait 10, run 10-11; head 11-12.
  st, est = one(ev(0, prefetch_loads=1, prefetch_used=1))
  assert st.layers[0].prefetch_copy == pytest.approx((0, 10 * ms))
  assert est.tpot_s == pytest.approx(12 * ms)
  # Behind a dense layer: copy 0-10; dense attention 0-1; layer 1 attention 1-2, experts 10-11; head 11-12.
  st, est = one(ev(0, expert_bytes=0), ev(1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[1].prefetch_copy == pytest.approx((0, 10 * ms))
  assert est.tpot_s == pytest.approx(12 * ms)


def test_gate_predictor_runs_after_the_plan():
  # Layer 0: attention 0-1, gate predictor (1 MB) 1-2, prefetch for layer 1 issued
  # at 2: copy 2-12; resident experts (3 hits) 2-5. Layer 1: attention 5-6,
  # experts wait for 12: 12-13; head 13-14.
  st, est = one(ev(0, hits=3, predictor="gate", predictor_bytes=MB), ev(1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[0].predictor == pytest.approx((1 * ms, 2 * ms))
  assert st.layers[0].resident_experts == pytest.approx((2 * ms, 5 * ms))
  assert st.layers[1].prefetch_copy == pytest.approx((2 * ms, 12 * ms))
  assert est.tpot_s == pytest.approx(14 * ms)


def test_gate_prefetch_reaches_the_next_moe_layer_across_a_dense_layer():
  # Layer 0 (MoE): attention 0-1, gate 1-2, copy for layer 2 2-12, experts 2-5.
  # Layer 1 (dense): attention 5-6. Layer 2: attention 6-7, experts 12-13; head 13-14.
  st, est = one(
    ev(0, hits=3, predictor="gate", predictor_bytes=MB), ev(1, expert_bytes=0), ev(2, prefetch_loads=1, prefetch_used=1)
  )
  assert st.layers[2].prefetch_copy == pytest.approx((2 * ms, 12 * ms))
  assert est.tpot_s == pytest.approx(14 * ms)


def test_provisional_predictor_waits_for_the_resident_experts():
  # Layer 0: attention 0-1, resident experts (3 hits) 1-4, then the predictor
  # (layer 1's attention and gate, 1 MB) 4-5; prefetch issued at 5: copy 5-15.
  # Layer 1: attention 5-6, experts wait for 15: 15-16; head 16-17 (3 ms more
  # than the gate predictor, which can start its copy right after the plan).
  st, est = one(ev(0, hits=3, predictor="provisional", predictor_bytes=MB), ev(1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[0].predictor == pytest.approx((4 * ms, 5 * ms))
  assert st.layers[1].prefetch_copy == pytest.approx((5 * ms, 15 * ms))
  assert est.tpot_s == pytest.approx(17 * ms)
  assert st.layers[0].gpu_s == pytest.approx(5 * ms)


def test_provisional_prefetch_queues_behind_the_demand_loads():
  # Layer 0: attention 0-1; demand copy 1-11; resident expert 1-2; predictor 2-3;
  # the prefetch issued at 3 waits for the link: 11-21; demand-loaded expert
  # 11-12; layer 0 ends 12. Layer 1: attention 12-13, experts 21-22; head 22-23.
  st, est = one(
    ev(0, hits=1, demand_loads=1, predictor="provisional", predictor_bytes=MB),
    ev(1, prefetch_loads=1, prefetch_used=1),
  )
  assert st.layers[0].predictor == pytest.approx((2 * ms, 3 * ms))
  assert st.layers[0].demand_experts == pytest.approx((11 * ms, 12 * ms))
  assert st.layers[1].prefetch_copy == pytest.approx((11 * ms, 21 * ms))
  assert est.tpot_s == pytest.approx(23 * ms)


def test_layernorm_prefetch_is_issued_at_layer_end():
  # Layer 0: attention 0-1; demand copy 1-11; resident expert 1-2; predictor
  # (norms + gate, 1 MB) 2-3; demand-loaded expert 11-12; layer ends 12 and only
  # then the prefetch is issued: 12-22. Layer 1: attention 12-13, experts 22-23;
  # head 23-24.
  st, est = one(
    ev(0, hits=1, demand_loads=1, predictor="layernorm", predictor_bytes=MB),
    ev(1, prefetch_loads=1, prefetch_used=1),
  )
  assert st.layers[0].predictor == pytest.approx((2 * ms, 3 * ms))
  assert st.layers[1].prefetch_copy == pytest.approx((12 * ms, 22 * ms))
  assert est.tpot_s == pytest.approx(24 * ms)
  # It also waits for the CPU work: 2 CPU experts 1-21, layer 0 ends 21, copy
  # 21-31; layer 1: attention 21-22, experts 31-32; head 32-33.
  layer0 = {"hits": 1, "cpu_experts": 2, "predictor_bytes": MB}
  st, est = one(ev(0, predictor="layernorm", **layer0), ev(1, prefetch_loads=1, prefetch_used=1))
  assert st.layers[1].prefetch_copy == pytest.approx((21 * ms, 31 * ms))
  assert est.tpot_s == pytest.approx(33 * ms)
  # The provisional predictor's copy (issued at 3: 3-13) is done before layer 1 needs
  # it: layer 1 attention 21-22, experts 22-23; head 23-24.
  assert one(ev(0, predictor="provisional", **layer0), ev(1, prefetch_loads=1, prefetch_used=1))[
    1
  ].tpot_s == pytest.approx(24 * ms)


def test_cpu_work_overlapping_copies_takes_the_max_not_the_sum():
  # Plan at 1. Link: demand copy 1-11; GPU: resident expert 1-2, demand-loaded 11-12.
  # CPU: 2 experts x 10 ms = 1-21. Layer ends at max(12, 21) = 21; head 21-22.
  # Serial sum would be 1 + 10 + 2 + 20 + 1 = 34 ms.
  st, est = one(ev(0, hits=1, demand_loads=1, cpu_experts=2))
  lt = st.layers[0]
  assert lt.cpu == pytest.approx((1 * ms, 21 * ms))
  assert lt.cpu.start < lt.demand_copy.end and lt.demand_copy.start < lt.cpu.end  # overlap
  assert lt.cpu.start < lt.experts.end and lt.experts.start < lt.cpu.end
  assert est.tpot_s == pytest.approx(22 * ms)
  assert lt.copy_stall_s == pytest.approx(9 * ms) and lt.cpu_wait_s == pytest.approx(9 * ms)
  # The other way round: CPU 1 expert (1-11) hides inside 2 demand copies (1-21);
  # resident expert 1-2, demand-loaded 21-23; head 23-24.
  st2, est2 = one(ev(0, hits=1, demand_loads=2, cpu_experts=1))
  assert est2.tpot_s == pytest.approx(24 * ms)
  assert st2.layers[0].cpu_wait_s == 0


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
    pytest.approx((0, 40 * ms)),
    pytest.approx((40 * ms, 80 * ms)),
    pytest.approx((80 * ms, 120 * ms)),
  ]
  assert [lt.experts.start for lt in st.layers] == pytest.approx([40 * ms, 80 * ms, 120 * ms])
  assert est.tpot_s == pytest.approx(123 * ms)
  assert st.link_s == pytest.approx(120 * ms)


def test_latency_and_kernel_overhead():
  # link latency 1 ms per batch, kernel overhead 0.5 ms per layer and for the head.
  # Attention 0-1.5; demand copy 1.5 + (1 + 10) = 1.5-12.5; expert 12.5-13.5;
  # head 13.5-15.
  prof = dataclasses.replace(TOY, link_latency_s=1 * ms, kernel_overhead_s=0.5 * ms)
  st, est = one(ev(0, demand_loads=1), profile=prof)
  assert st.layers[0].demand_copy == pytest.approx((1.5 * ms, 12.5 * ms))
  assert est.tpot_s == pytest.approx(15 * ms)


def test_compute_bound_prefill_and_token_expert_pairs():
  # gpu_flops = 1e10. 100 tokens, bf16 (2 B): a 1 MB block is 5e5 params,
  # 2 * 100 * 5e5 = 1e8 FLOP = 10 ms (> 1 ms to read it): compute-bound; one
  # pair costs 0.1 ms. Attention 10 ms; 4 experts assumed to see all 100 tokens:
  # 40 ms; head 10 ms. TTFT = 60 ms. With gpu_pairs = 200 (top-2): 20 ms -> 40 ms.
  prof = dataclasses.replace(TOY, gpu_flops=1e10)
  kw = {"kind": "prefill", "tokens": 100}
  est = estimate_tpot([step(ev(0, tokens=100, hits=4), **kw)], prof)
  assert est.ttft_s == pytest.approx(60 * ms) and est.tpot_s is None
  est = estimate_tpot([step(ev(0, tokens=100, hits=4, gpu_pairs=200), **kw)], prof)
  assert est.ttft_s == pytest.approx(40 * ms)
  # 2 resident + 2 demand-loaded experts, 200 pairs of which 50 demand: resident
  # 150 pairs = 15 ms, demand 50 pairs = 5 ms. Attention 0-10, copy 10-30,
  # resident 10-25, demand-loaded 30-35, head 35-45.
  layer = {"tokens": 100, "hits": 2, "demand_loads": 2, "gpu_pairs": 200}
  est = estimate_tpot([step(ev(0, demand_pairs=50, **layer), **kw)], prof)
  assert est.steps[0].layers[0].resident_experts == pytest.approx((10 * ms, 25 * ms))
  assert est.ttft_s == pytest.approx(45 * ms)
  # demand_pairs unknown: the 200 pairs split 2 : 2 -> 10 ms each; demand-loaded 30-40, head 40-50.
  assert estimate_tpot([step(ev(0, **layer), **kw)], prof).ttft_s == pytest.approx(50 * ms)
  # CPU compute-bound: cpu_flops 1e10, 1 expert with cpu_pairs = 100 -> 2*100*5e5/1e10 = 10 ms
  # (= its 10 ms read time); with 50 pairs it stays memory-bound at 10 ms; with
  # 300 tokens all routed (pairs unknown): 30 ms.
  prof = dataclasses.replace(TOY, cpu_flops=1e10)
  est = estimate_tpot([step(ev(0, tokens=300, cpu_experts=1), kind="prefill", tokens=300)], prof)
  assert est.steps[0].layers[0].cpu.duration == pytest.approx(30 * ms)
  est = estimate_tpot([step(ev(0, tokens=300, cpu_experts=1, cpu_pairs=50), kind="prefill", tokens=300)], prof)
  assert est.steps[0].layers[0].cpu.duration == pytest.approx(10 * ms)


def test_target_dtype_rescales_weight_bytes():
  # The run recorded float32 bytes (dtype 4); on the target the weights are fp16:
  # every byte count halves. All hits: (1 + 2) * 2 + 1 = 7 ms -> 3.5 ms.
  trace = [step(ev(0, hits=2), ev(1, hits=2), dtype_bytes=4)]
  assert estimate_tpot(trace, TOY).tpot_s == pytest.approx(7 * ms)
  assert estimate_tpot(trace, TOY, target_dtype_bytes=2).tpot_s == pytest.approx(3.5 * ms)
  # With a demand copy: attention 1, copy 10 (resident expert under it), demand
  # expert 1, head 1 = 13 ms -> 6.5 ms.
  trace = [step(ev(0, hits=1, demand_loads=1), dtype_bytes=4)]
  assert estimate_tpot(trace, TOY).tpot_s == pytest.approx(13 * ms)
  assert estimate_tpot(trace, TOY, target_dtype_bytes=2).tpot_s == pytest.approx(6.5 * ms)
  # dtype_bytes overrides the trace's own (affects FLOPs only, here memory-bound).
  assert estimate_tpot(trace, TOY, dtype_bytes=2).tpot_s == pytest.approx(13 * ms)
  with pytest.raises(ValueError, match="target_dtype_bytes"):
    estimate_tpot(trace, TOY, target_dtype_bytes=0)


def test_dense_layer_and_empty_expert_phase():
  # Dense layer (expert_bytes = 0): attention only, 1 ms; head 1 ms.
  st, est = one(ev(0, expert_bytes=0))
  assert est.tpot_s == pytest.approx(2 * ms)
  assert st.layers[0].experts.duration == 0


def test_split_misses_counts():
  # Equal costs c. balance: load (0 <= 0), CPU (c > 0), load (c <= c), CPU (2c > c), ...
  # greedy: CPU (0 < 0 fails), load (0 < c), CPU (c < c fails), load (c < 2c), ...
  assert [split_misses(m, 1.0, 1.0, "balance") for m in range(6)] == [0, 1, 1, 2, 2, 3]
  assert [split_misses(m, 1.0, 1.0, "greedy") for m in range(6)] == [0, 0, 1, 1, 2, 2]
  # Loading 3x as expensive: balance loads 1 then computes 3 on the CPU (3 <= 3 loads the 5th).
  assert [split_misses(m, 3.0, 1.0, "balance") for m in range(1, 7)] == [1, 1, 1, 1, 2, 2]
  assert [split_misses(m, 3.0, 1.0, "greedy") for m in range(1, 7)] == [0, 1, 1, 1, 1, 2]
  with pytest.raises(ValueError, match="greedy"):
    split_misses(2, 1.0, 1.0, "")


@pytest.mark.parametrize("c_load, c_cpu", [(1.0, 1.0), (3.0, 1.0), (1.0, 3.0), (0.1, 0.2), (7e-4, 2.16e-4)])
def test_balance_count_matches_the_engine_split(c_load, c_cpu):
  for misses in range(10):
    scores = np.linspace(1.0, 0.1, misses) if misses else np.zeros(0)
    load, _ = engine_split(np.asarray(scores, np.float32), c_load=c_load, c_cpu=c_cpu)
    assert split_misses(misses, c_load, c_cpu, "balance") == int(load.sum()), misses


def test_rule_split_layers_are_resplit_with_the_profile_costs():
  # On TOY a copy and a CPU expert both cost 10 ms. The run computed its 3
  # misses on the CPU; "balance" on TOY loads 2 and computes 1:
  # attention 0-1; demand copy (2) 1-21; CPU (1) 1-11; resident expert 1-2;
  # demand-loaded experts 21-23; head 23-24.
  layer = {"hits": 1, "cpu_experts": 3}
  st, est = one(ev(0, split="balance", **layer))
  lt = st.layers[0]
  assert (lt.demand_loads, lt.cpu_experts, lt.resplit) == (2, 1, True)
  assert lt.demand_copy == pytest.approx((1 * ms, 21 * ms)) and lt.cpu == pytest.approx((1 * ms, 11 * ms))
  assert est.tpot_s == pytest.approx(24 * ms)
  assert est.resplit_layers == 1 and st.resplit_layers == 1 and summarize(est)["resplit_layers"] == 1
  # "greedy" loads 1 and computes 2: copy 1-11, CPU 1-21, demand-loaded 11-12, end 21, head 21-22.
  st, est = one(ev(0, split="greedy", **layer))
  assert (st.layers[0].demand_loads, st.layers[0].cpu_experts) == (1, 2)
  assert est.tpot_s == pytest.approx(22 * ms)
  # As recorded (no rule, or resplit=False): CPU 3 x 10 = 1-31, head 31-32.
  for kw in ({"layer": ev(0, **layer)}, {"layer": ev(0, split="balance", **layer), "resplit": False}):
    st, est = one(kw["layer"], resplit=kw.get("resplit", True))
    assert est.tpot_s == pytest.approx(32 * ms) and est.resplit_layers == 0
  # A recorded split that the profile's costs keep is not counted as re-split.
  st, est = one(ev(0, demand_loads=2, cpu_experts=1, split="balance"))
  assert est.resplit_layers == 0 and (st.layers[0].demand_loads, st.layers[0].cpu_experts) == (2, 1)


def test_resplit_moves_pairs_in_proportion():
  # Prefill of 4 tokens, gpu_flops = 1e9: a pair of a 1 MB bf16 expert costs
  # 2 * 5e5 / 1e9 = 1 ms, reading it 1 ms. Recorded: 1 demand expert (2 pairs) and
  # 3 CPU experts (6 pairs) = 8 miss pairs over 4 misses. On TOY balance loads 2:
  # they take 8 * 2 / 4 = 4 pairs -> max(2 ms read, 4 ms compute) = 4 ms.
  # Attention: max(1 ms, 2 * 4 * 5e5 / 1e9 = 4 ms) = 4 ms, 0-4; copy 4-24; CPU (2) 4-24;
  # demand-loaded experts 24-28; head 28-32.
  prof = dataclasses.replace(TOY, gpu_flops=1e9)
  layer = ev(0, tokens=4, demand_loads=1, cpu_experts=3, gpu_pairs=2, demand_pairs=2, cpu_pairs=6, split="balance")
  est = estimate_tpot([step(layer, kind="prefill", tokens=4)], prof)
  lt = est.steps[0].layers[0]
  assert (lt.demand_loads, lt.cpu_experts) == (2, 2)
  assert lt.demand_experts == pytest.approx((24 * ms, 28 * ms))
  assert est.ttft_s == pytest.approx(32 * ms)


def test_resplit_uses_the_profile_expert_costs():
  # On the RTX 4060 Ti profile an 8.65 MB fp16 expert copies in ~0.70 ms and computes
  # on the CPU in ~0.22 ms: balance sends most misses to the CPU.
  prof = get_profile("rtx4060ti_16gb")
  c_load, c_cpu = expert_costs(prof, 8_650_752)
  layer = ev(0, dense_bytes=50 * MB, expert_bytes=8_650_752, hits=2, demand_loads=4, split="balance")
  st, _ = one(layer, profile=prof)
  n_load = split_misses(4, c_load, c_cpu, "balance")
  assert n_load == 1 and (st.layers[0].demand_loads, st.layers[0].cpu_experts) == (1, 3)


def test_tpot_is_mean_of_decode_steps_and_ttft_mean_of_prefills():
  # Prefill A in two chunks (3 ms each, 1 layer with 1 hit + head), decode 3 ms
  # and 13 ms (1 hit + 1 demand load), prefill B one chunk of 3 ms, decode 3 ms.
  # TTFT = mean(6, 3) = 4.5 ms; TPOT = mean(3, 13, 3) = 19/3 ms.
  fast, slow = ev(0, hits=1), ev(0, hits=1, demand_loads=1)
  trace = [
    step(fast, kind="prefill", step_idx=0),
    step(fast, kind="prefill", step_idx=1),
    step(fast, step_idx=2),
    step(slow, step_idx=3),
    step(fast, kind="prefill", step_idx=4),
    step(fast, step_idx=5),
  ]
  est = estimate_tpot(trace, TOY)
  assert est.ttft_s == pytest.approx(4.5 * ms)
  assert est.tpot_s == pytest.approx(19 / 3 * ms)
  rows = est.layer_breakdown("decode")
  assert len(rows) == 1 and rows[0]["steps"] == 3
  assert rows[0]["stall_s"] == pytest.approx(9 / 3 * ms)


def test_summary_is_json_and_labelled():
  trace = [
    step(
      ev(0, hits=1, demand_loads=1, cpu_experts=1, measured={"copy": 0.5}, predictor="gate", predictor_bytes=MB),
      ev(1, prefetch_loads=2, prefetch_used=1),
      hidden_size=8,
    )
  ]
  est = estimate_tpot(trace, "rtx3080ti_12gb")
  assert est.label == "estimate" and est.profile == "rtx3080ti_12gb"
  with pytest.raises(TypeError):
    type(est)(
      profile="x",
      tpot_s=1.0,
      ttft_s=None,
      decode_tokens_per_s=None,
      steps=(),
      dtype_bytes=None,
      target_dtype_bytes=None,
      hardware=TOY,
      resplit=True,
      resplit_layers=0,
      label="measured",
    )
  s = summarize(est, timelines=True)
  assert s["label"] == "estimate" and s["resplit"] is True and s["resplit_layers"] == 0
  assert s["profile_spec"]["sources"]["gpu_mem_bw"].startswith("vendor")
  assert s["profile_spec"]["sources"]["plan_s"].startswith("assumption")
  assert s["steps"][0]["measured"] == {"copy": 0.5}
  assert s["steps"][0]["wall_s"] == 0.123
  layer0 = s["steps"][0]["layers"][0]
  assert layer0["demand_copy"][1] > layer0["demand_copy"][0]
  assert layer0["plan"][1] - layer0["plan"][0] == pytest.approx(get_profile("rtx3080ti_12gb").plan_s)
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
  layer = {"tokens": 1, "dense_bytes": 50 * MB, "expert_bytes": 8_650_752}
  resident = [step(*[ev(i, hits=4, **layer) for i in range(24)], hidden_size=2048)]
  missing = [step(*[ev(i, hits=2, demand_loads=2, **layer) for i in range(24)], hidden_size=2048)]
  on_cpu = [step(*[ev(i, hits=2, cpu_experts=2, **layer) for i in range(24)], hidden_size=2048)]
  t_res, t_miss, t_cpu = (estimate_tpot(t, prof).tpot_s for t in (resident, missing, on_cpu))
  # Memory-bound floor: bytes / bandwidth.
  floor = (24 * (50 * MB + 4 * 8_650_752) + MB) / prof.gpu_mem_bw
  assert t_res >= floor and t_res < 1.5 * floor + 24 * (prof.kernel_overhead_s + prof.plan_s)
  assert t_miss > t_res and t_cpu > t_res
  check_invariants(estimate_tpot(on_cpu, prof).steps[0])


def test_command_line_reestimates_a_saved_trace(tmp_path):
  from moejax.sim import save_trace
  from moejax.sim.__main__ import main

  path = tmp_path / "trace.json"
  save_trace(path, [step(ev(0, hits=1, demand_loads=1), dtype_bytes=4)])
  out = tmp_path / "est.json"
  args = [str(path), "--profile", "h200", "--profile", "a6000_48gb", "--target_dtype_bytes", "2", "--out", str(out)]
  assert main(args) == 0
  doc = json.loads(out.read_text())
  assert doc["label"] == "estimate" and set(doc["estimates"]) == {"h200", "a6000_48gb"}
  assert all(e["label"] == "estimate" and e["tpot_s"] > 0 for e in doc["estimates"].values())
