"""Mixture-of-Experts math: router scores, the model's own top-k, expert compute.

The MoE block is split so that an offloading engine can sit between routing
and expert compute: `Router` gives scores `[N, E]`; `select_experts` applies
the model's own top-k rule; `combine_weights` turns the chosen experts'
scores into mixing weights; `routed_experts` computes experts from *given*
weight buffers `[S, ...]` addressed by slot index, so the weights may be a
device cache of S <= E slots, or all E experts.

Shapes: N tokens (flattened batch), D hidden, E routed experts, k experts per
token, S slots, F expert width. Expert weights are kept in the checkpoints'
`[out, in]` layout, like every matrix of the model (see `layers.linear`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.models.config import MoEConfig
from moejax.models.layers import MLP, Linear, activation, linear


class ExpertWeights(NamedTuple):
  """Stacked routed-expert weights: gate `[S, F, D]`, up `[S, F, D]`, down `[S, D, F]` (`[out, in]` per expert).

  Wherever stacks live (a resident model, the host store, device cache
  slots), bfloat16 weights are held as their uint16 bit patterns (`stored`):
  XLA:CPU widens bfloat16 data movement to float32, so slicing one expert out
  of a bfloat16 stack cost a float32 copy of it (a third of the memory
  bandwidth per expert, and whole-buffer rewrites when filling a slot).
  `expert` reads an expert back as bfloat16; `values` reads whole stacks.
  """

  gate: jax.Array
  up: jax.Array
  down: jax.Array


def stored(a: jax.Array) -> jax.Array:
  """An expert array as stacks hold it: bfloat16 as its uint16 bit pattern, other dtypes as they are (traceable)."""
  return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


def as_stored(a):
  """A concrete array (numpy or JAX) as stacks hold it, in the same memory; only bfloat16 arrays are copied."""
  if np.dtype(a.dtype) != jnp.bfloat16:
    return a
  bits = np.asarray(a).view(np.uint16)
  return jax.device_put(bits, a.sharding) if isinstance(a, jax.Array) else bits


def stored_dtype(dtype) -> np.dtype:
  """The dtype in which stacks hold experts of `dtype` (uint16 for bfloat16)."""
  return np.dtype(np.uint16) if np.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)


def value_dtype(dtype) -> np.dtype:
  """The dtype of the weights a stack of `dtype` holds (bfloat16 for uint16)."""
  return np.dtype(jnp.bfloat16) if np.dtype(dtype) == np.uint16 else np.dtype(dtype)


def _value(a: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def values(weights: ExpertWeights) -> ExpertWeights:
  """Whole stacks as their weights (uint16 read as bfloat16; traceable): for computations over every expert."""
  return ExpertWeights(*(_value(a) for a in weights))


def expert(weights: ExpertWeights, slot: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The (gate `[F, D]`, up `[F, D]`, down `[D, F]`) of one slot; uint16 stacks are read as bfloat16."""
  return tuple(_value(jax.lax.dynamic_index_in_dim(w, slot, keepdims=False)) for w in weights)


class Router(nnx.Module):
  """Linear router producing per-expert scores (the expert's importance)."""

  def __init__(self, config: MoEConfig, *, dtype=jnp.float32):
    weight_dtype = jnp.float32 if config.router_fp32 else dtype
    self.weight = nnx.Param(jnp.zeros((config.num_experts, config.hidden_size), weight_dtype))  # [E, D]
    # DeepSeek-V3's e_score_correction_bias: shifts selection only, never the weights.
    self.bias = nnx.Param(jnp.zeros((config.num_experts,), jnp.float32)) if config.router_bias else None
    self.scoring_func = config.scoring_func

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: `[N, D]` -> scores `[N, E]` in float32 (softmax or sigmoid of the logits)."""
    w = self.weight[...]
    logits = linear(x.astype(w.dtype), w).astype(jnp.float32)
    if self.scoring_func == "softmax":
      return jax.nn.softmax(logits, axis=-1)
    if self.scoring_func == "sigmoid":
      return jax.nn.sigmoid(logits)
    raise ValueError(f"Unsupported scoring_func {self.scoring_func!r}; use 'softmax' or 'sigmoid'.")

  def selection_bias(self) -> jax.Array | None:
    return None if self.bias is None else self.bias[...]


def select_experts(config: MoEConfig, scores: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """The model's own expert choice. scores `[N, E]` -> expert ids `[N, k]` int32.

  greedy: top-k of the scores. group_limited_greedy (DeepSeek-V2): experts
  are split into `n_group` groups, a group scores by its best expert, and
  experts outside the `topk_group` best groups get score 0. noaux_tc
  (DeepSeek-V3): selection on `scores + bias`, a group scores by the sum of
  its two best (biased) experts, experts outside the kept groups get -inf.
  """
  if config.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
    raise ValueError(f"Unsupported topk_method {config.topk_method!r}.")
  sel = scores if bias is None else scores + bias
  if config.topk_method != "greedy" and config.topk_group < config.n_group:
    n, e = sel.shape
    grouped = sel.reshape(n, config.n_group, e // config.n_group)
    if config.topk_method == "noaux_tc":
      group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_score = grouped.max(-1)
    _, top_groups = jax.lax.top_k(group_score, config.topk_group)
    group_mask = jnp.zeros((n, config.n_group), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
    expert_mask = jnp.repeat(group_mask, e // config.n_group, axis=1)
    sel = jnp.where(expert_mask, sel, -jnp.inf if config.topk_method == "noaux_tc" else 0.0)
  return jax.lax.top_k(sel, config.num_experts_per_tok)[1].astype(jnp.int32)


def combine_weights(config: MoEConfig, gate_scores: jax.Array) -> jax.Array:
  """Mixing weights `[N, k]` from the chosen experts' (unbiased) scores `[N, k]`.

  Applies the model's top-k renormalisation (`w / (sum w + 1e-20)`) and
  routed scaling factor, so that substituted experts are weighted the way the
  model weights its own.
  """
  w = gate_scores
  if config.norm_topk_prob:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  return w * config.routed_scaling_factor


def own_routing(config: MoEConfig, scores: jax.Array, bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The model's own routing: expert ids `[N, k]` and their mixing weights `[N, k]` from scores `[N, E]`."""
  idx = select_experts(config, scores, bias)
  return idx, combine_weights(config, jnp.take_along_axis(scores, idx, axis=-1))


def _expert_ffn(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, act: str) -> jax.Array:
  """One expert on x `[M, D]`: gate/up `[F, D]`, down `[D, F]` -> `[M, D]` in x's dtype."""
  return linear(activation(act)(linear(x, gate)) * linear(x, up), down)


# `routed_experts` reads one expert per (token, expert) pair up to 64 pairs, or up to this many pairs per slot
# on average: a grouped block's product costs a fixed ~1.5 ms per expert (XLA:CPU packs the expert's matrices for
# its GEMM) besides its arithmetic, so one-row products win while an expert serves fewer than ~8 tokens (float32) or
# ~4 (bfloat16, held as uint16), measured on 17 MB experts (60 of width 1408, hidden 2048).
_PAIRWISE_MAX = 64
_PAIRWISE_PER_SLOT = {np.dtype(np.float32): 8, np.dtype(np.uint16): 4}


def routed_experts(
  x: jax.Array, weights: ExpertWeights, slots: jax.Array, mix: jax.Array, act: str = "silu"
) -> jax.Array:
  """Weighted sum of routed experts, reading weights from slot buffers.

  Args:
    x: `[N, D]` token activations.
    weights: `ExpertWeights` with leading dim S (slots; S = E when resident).
    slots: `[N, k]` int32 slot of each chosen expert; entries < 0 are skipped.
    mix: `[N, k]` mixing weights.
    act: activation name.

  Returns:
    `[N, D]` in the dtype of x.

  Few pairs (decode, short prompts) run one expert per pair, a loop of
  one-row products that read only the chosen experts' weights (skipped pairs
  read none); many (long prompts) are grouped by slot (`_grouped_experts`),
  so an expert's weights are read once per block of its tokens.
  """
  n, k = slots.shape
  num_slots, per_slot = weights.gate.shape[0], _PAIRWISE_PER_SLOT.get(np.dtype(weights.gate.dtype), 0)
  if n * k > max(_PAIRWISE_MAX, per_slot * num_slots):
    return _grouped_experts(x, weights, slots, mix, act)
  return pairwise_experts(x, weights, slots, mix, act)


def pairwise_experts(
  x: jax.Array, weights: ExpertWeights, slots: jax.Array, mix: jax.Array, act: str = "silu"
) -> jax.Array:
  """`routed_experts` one pair at a time (the decode path): a loop of one-row products over the pairs.

  Same arguments and result as `routed_experts`. Each pair reads its expert's
  weights (skipped pairs read none); pairs run in slot order, so consecutive
  pairs of one expert find its weights still in the CPU's caches.
  """
  n, k = slots.shape
  flat_slots, token, flat_mix = jax.lax.sort(
    (slots.reshape(-1), jnp.arange(n * k, dtype=jnp.int32) // k, mix.reshape(-1).astype(jnp.float32)), num_keys=1
  )

  def add_one(p, out):
    g, u, d = expert(weights, flat_slots[p])
    y = _expert_ffn(jax.lax.dynamic_slice_in_dim(x, token[p], 1), g, u, d, act).astype(jnp.float32)
    return out.at[token[p]].add(flat_mix[p] * y[0])

  def maybe_add(p, out):  # skipped pairs read no weights
    return jax.lax.cond(flat_slots[p] >= 0, add_one, lambda _, o: o, p, out)

  out = jax.lax.fori_loop(0, n * k, maybe_add, jnp.zeros(x.shape, jnp.float32))
  return out.astype(x.dtype)


def _grouped_experts(x: jax.Array, weights: ExpertWeights, slots: jax.Array, mix: jax.Array, act: str) -> jax.Array:
  """`routed_experts` for many pairs: pairs sorted by slot into blocks of B rows, one slot per block.

  Each slot's pairs fill ceil(count / B) blocks (the last one padded); a loop
  over the blocks in use multiplies each block `[B, D]` by its slot's weights,
  so every expert is read once per B of its tokens. B grows with the pairs per
  slot; the number of blocks is bounded statically by N k / B + min(S, N k).
  """
  n, k = slots.shape
  num_slots, pairs = weights.gate.shape[0], n * k
  block = min(64, max(8, 1 << max(0, math.ceil(pairs / num_slots) - 1).bit_length()))
  n_blocks = -(-pairs // block) + min(num_slots, pairs)
  flat = slots.reshape(-1)
  valid = flat >= 0
  key = jnp.where(valid, flat, num_slots)  # skipped pairs sort last, into no block
  order = jnp.argsort(key)
  sorted_slot = key[order]
  counts = jnp.bincount(key, length=num_slots + 1)[:num_slots]
  padded = -(-counts // block) * block
  block_end = jnp.cumsum(padded)  # [S] end row of each slot's blocks
  rank = jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[jnp.minimum(sorted_slot, num_slots - 1)]
  rows = n_blocks * block
  row = jnp.where(sorted_slot < num_slots, (block_end - padded)[jnp.minimum(sorted_slot, num_slots - 1)] + rank, rows)
  token = order // k
  xs = jnp.zeros((rows + 1, x.shape[1]), x.dtype).at[row].set(x[token])  # row `rows` collects skipped pairs
  block_slot = jnp.searchsorted(block_end, jnp.arange(n_blocks) * block, side="right")

  def one_block(b, ys):
    s = block_slot[b]
    g, u, d = expert(weights, s)
    y = _expert_ffn(jax.lax.dynamic_slice_in_dim(xs, b * block, block), g, u, d, act).astype(jnp.float32)
    return jax.lax.dynamic_update_slice_in_dim(ys, y, b * block, 0)

  used = block_end[-1] // block
  ys = jax.lax.fori_loop(0, used, one_block, jnp.zeros((rows + 1, x.shape[1]), jnp.float32))
  w = jnp.where(valid, mix.reshape(-1), 0.0)[order].astype(jnp.float32)
  out = jnp.zeros(x.shape, jnp.float32).at[token].add(w[:, None] * ys[row])
  return out.astype(x.dtype)


class SharedExperts(nnx.Module):
  """Shared expert(s) that every token uses; optional sigmoid gate (Qwen2-MoE)."""

  def __init__(self, config: MoEConfig, *, dtype=jnp.float32):
    self.mlp = MLP(config.hidden_size, config.shared_intermediate_size, config.hidden_act, dtype=dtype)
    self.gate = Linear(config.hidden_size, 1, dtype=dtype) if config.shared_expert_gate else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: `[N, D]` -> `[N, D]`."""
    y = self.mlp(x)
    if self.gate is not None:
      y = jax.nn.sigmoid(self.gate(x)) * y
    return y


class MoEBlock(nnx.Module):
  """The non-routed part of an MoE layer: router and shared experts.

  Routed expert weights are not owned here: they are passed to
  `routed_experts`, so that where they live is the caller's business.
  """

  def __init__(self, config: MoEConfig, *, dtype=jnp.float32):
    self.router = Router(config, dtype=dtype)
    self.shared = SharedExperts(config, dtype=dtype) if config.shared_intermediate_size else None

  def shared_output(self, x: jax.Array) -> jax.Array:
    """x: `[N, D]` -> shared experts' contribution `[N, D]` (zeros if none)."""
    return jnp.zeros_like(x) if self.shared is None else self.shared(x)
