"""Host store, in-graph slot fills and host expert compute against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models.config import MoEConfig
from moejax.models.moe import ExpertWeights, routed_experts
from moejax.offload import slots as slot_cache
from moejax.offload.cpu import host_experts
from moejax.offload.store import HostExpertStore

E, D, F = 6, 8, 5


def _layer(seed=0):
  rng = np.random.default_rng(seed)
  return ExpertWeights(*(rng.standard_normal(s).astype(np.float32) for s in ((E, F, D), (E, F, D), (E, D, F))))


def test_store_keeps_experts_in_pinned_host_memory():
  layer = _layer()
  store = HostExpertStore([None, layer])
  assert store.layers[0] is None
  for got, want in zip(store.layers[1], layer):
    assert got.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(got), want)


def test_write_slots_copies_given_experts_and_skips_padding():
  layer = _layer()
  store = HostExpertStore([layer]).layers[0]
  buffers = ExpertWeights(*(jnp.full((4, *a.shape[1:]), -1.0, a.dtype) for a in layer))
  experts = jnp.asarray([5, -1, 2], jnp.int32)  # -1: padding, copies nothing
  slots = jnp.asarray([3, 0, 1], jnp.int32)
  out = slot_cache.write_slots(buffers, store, experts, slots)
  for got, src in zip(out, layer):
    got = np.asarray(got)
    np.testing.assert_array_equal(got[3], src[5])
    np.testing.assert_array_equal(got[1], src[2])
    assert (got[0] == -1).all() and (got[2] == -1).all()  # untouched slots
  assert all(a.sharding.memory_kind == "device" for a in out)


def _numpy_experts(x, layer, experts, mix, on_cpu):
  """Brute force: sum over marked pairs of mix * down(silu(gate x) * (up x)), weights `[out, in]`."""
  out = np.zeros(x.shape, np.float64)
  for n in range(x.shape[0]):
    for j in range(experts.shape[1]):
      if on_cpu[n, j]:
        g, u, d = (a[experts[n, j]].astype(np.float64) for a in layer)
        a = g @ x[n]
        out[n] += mix[n, j] * d @ ((a / (1 + np.exp(-a))) * (u @ x[n]))
  return out


@pytest.mark.parametrize("tokens", [3, 40], ids=["one_expert_per_pair", "grouped_by_slot"])
def test_host_experts_matches_numpy_for_marked_pairs_only(tokens):
  layer = _layer(1)
  store = HostExpertStore([layer]).layers[0]
  rng = np.random.default_rng(2)
  x = rng.standard_normal((tokens, D)).astype(np.float32)
  experts = rng.integers(0, E, (tokens, 2)).astype(np.int32)
  experts[:3] = [[0, 4], [4, 5], [1, 2]]
  mix = rng.random((tokens, 2)).astype(np.float32)
  on_cpu = rng.random((tokens, 2)) < 0.5
  on_cpu[:3] = [[True, False], [True, True], [False, False]]
  fn = jax.jit(host_experts, static_argnames="act")
  got = fn(jnp.asarray(x), store, jnp.asarray(experts), jnp.asarray(mix), jnp.asarray(on_cpu), act="silu")
  assert got.dtype == jnp.float32 and got.sharding.memory_kind == "device"
  np.testing.assert_allclose(np.asarray(got), _numpy_experts(x, layer, experts, mix, on_cpu), atol=1e-5)
  assert not np.asarray(got)[2].any()  # a token without CPU pairs gets nothing


def test_bf16_slots_hold_bit_patterns_read_as_the_experts():
  """bf16 experts copied into (uint16) slots compute exactly what the same experts compute from the store."""
  layer = ExpertWeights(*(a.astype(jnp.bfloat16) for a in _layer(3)))
  store = HostExpertStore([layer]).layers[0]
  config = MoEConfig(
    model_type="test",
    vocab_size=8,
    hidden_size=D,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=D,
    moe_intermediate_size=F,
    num_experts=E,
    num_experts_per_tok=2,
    moe_layers=(True,),
    sliding_windows=(None,),
  )
  buffers = slot_cache.empty_slots(config, 3, jnp.bfloat16)
  assert all(b.dtype == jnp.uint16 for b in buffers)
  buffers = slot_cache.write_slots(buffers, store, jnp.asarray([4, 1], jnp.int32), jnp.asarray([2, 0], jnp.int32))
  np.testing.assert_array_equal(
    np.asarray(jax.lax.bitcast_convert_type(buffers.up[2], jnp.bfloat16)), np.asarray(layer.up[4])
  )
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, D)), jnp.bfloat16)
  mix = jnp.asarray([[0.7, 0.3], [0.4, 0.6]], jnp.float32)
  from_slots = routed_experts(x, buffers, jnp.asarray([[2, 0], [0, -1]], jnp.int32), mix)
  from_layer = routed_experts(x, layer, jnp.asarray([[4, 1], [1, -1]], jnp.int32), mix)
  np.testing.assert_array_equal(np.asarray(from_slots), np.asarray(from_layer))
