"""`Model`: a loaded MoE language model, fully resident forward and greedy decode.

A `Model` bundles the configuration, the decoder (every parameter except the
routed experts, as an NNX module) and the routed experts per layer as
`ExpertWeights` stacked `[E, ...]`. The routed experts may be device arrays
(resident) or `pinned_host` arrays (for the offload engine, which moves them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import validation
from moejax.models import decoder as decoder_lib
from moejax.models.compile import compiler_options
from moejax.models.config import MoEConfig
from moejax.models.moe import ExpertWeights, as_stored


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
  """Rotary positions `[B, T]` of a left-padded batch: 0 at each first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= n (and >= minimum): padded lengths that bound recompilation."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))


def left_pad(ids: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads `[B, T]` ids and mask to `[B, length]` (padding is masked out, so results are unchanged)."""
  pad = length - ids.shape[1]
  return np.pad(ids, ((0, 0), (pad, 0))), np.pad(mask, ((0, 0), (pad, 0)))


def _forward(graphdef, state, experts, ids, positions, valid, caches, index):
  decoder = nnx.merge(graphdef, state)
  return decoder_lib.forward(decoder, experts, ids, positions, valid, index, caches)


def _greedy(graphdef, length, state, experts, logits, caches, positions, index, steps):
  """Greedy decoding as one program: (`steps` (<= length) tokens `[B, length]`, the rest zeros; caches).

  logits: `[B, 1, V]` after the prompt; positions: `[B, 1]` rotary position
  and index: cache row of the first new token, both advancing by one per step.
  """
  decoder = nnx.merge(graphdef, state)
  ones = jnp.ones(positions.shape, bool)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(i, carry):
    token, caches, out = carry
    logits, caches = decoder_lib.forward(decoder, experts, token[:, None], positions + i, ones, index + i, caches)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return token, caches, out.at[:, i + 1].set(token)

  out = jnp.zeros((first.shape[0], length), jnp.int32).at[:, 0].set(first)
  _, caches, out = jax.lax.fori_loop(0, steps - 1, step, (first, caches, out))
  return out, caches  # the caches are returned so that their donated buffers carry the loop in place


@functools.cache
def _programs():
  """The jitted (forward, greedy) pair, compiled with `compile.compiler_options()` of the default backend."""
  options = compiler_options()
  return (
    jax.jit(_forward, static_argnums=0, donate_argnums=(6,), compiler_options=options),
    jax.jit(_greedy, static_argnums=(0, 1), donate_argnums=(5,), compiler_options=options),
  )


class Model:
  """A loaded MoE model. Use `moejax.load(path)` to build one.

  Attributes:
    config: the `MoEConfig`.
    decoder: NNX module with all non-routed parameters.
    experts: per layer, `ExpertWeights` `[E, ...]` (None for dense layers);
      bfloat16 experts held as uint16 bit patterns (`moe.stored`; read the
      weights with `moe.values`).
  """

  def __init__(self, config: MoEConfig, decoder: decoder_lib.Decoder, experts: Sequence[ExpertWeights | None]):
    self.config = config
    self.decoder = decoder
    self.experts = [None if w is None else ExpertWeights(*(as_stored(a) for a in w)) for w in experts]
    self.graphdef, self.state = nnx.split(decoder)

  @property
  def dtype(self):
    return self.decoder.embed_tokens[...].dtype

  def experts_on_device(self) -> list[ExpertWeights | None]:
    """Routed experts in device memory: host-resident ones are copied, device arrays returned as they are."""

    def on_device(a):  # device_put to a memory space copies even an array already there
      return (
        a
        if isinstance(a, jax.Array) and a.sharding.memory_kind == "device"
        else jax.device_put(a, jax.memory.Space.Device)
      )

    return [None if w is None else ExpertWeights(*(on_device(a) for a in w)) for w in self.experts]

  def init_caches(self, batch: int, max_len: int):
    return self.decoder.init_caches(batch, max_len)

  def forward(self, input_ids, attention_mask=None) -> jax.Array:
    """Causal forward: input_ids `[B, T]` -> logits `[B, T, V]`.

    attention_mask `[B, T]` is 1 for real tokens (default: all); a row's real
    tokens are one contiguous run, left or right padded (`moejax.validation`).
    Logits at padding positions are meaningless.
    """
    ids, mask = validation.prompt_batch(
      input_ids, attention_mask, vocab_size=self.config.vocab_size, right_padding=True
    )
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    caches = self.init_caches(ids.shape[0], ids.shape[1])
    forward, _ = _programs()
    experts = self.experts_on_device()
    logits, _ = forward(self.graphdef, self.state, experts, ids, prompt_positions(mask), mask, caches, 0)
    return logits

  def generate(self, input_ids, max_new_tokens: int, attention_mask=None) -> np.ndarray:
    """Greedy decoding, fully resident, with a KV cache.

    Args:
      input_ids: `[B, T]` prompts, left padded where `attention_mask` is 0.
      max_new_tokens: N >= 0 tokens to generate (no early stop at EOS).
      attention_mask: `[B, T]` 1 for real tokens (default: all); every row
        needs one, and each row's real tokens end the row.

    Returns:
      tokens `[B, T + N]` int32 (prompt followed by the generated tokens).
    """
    ids, mask = validation.prompt_batch(input_ids, attention_mask, vocab_size=self.config.vocab_size)
    max_new_tokens = validation.count(max_new_tokens, name="max_new_tokens")
    t_in = ids.shape[1]
    # Bucketed prompt and cache lengths: one compilation serves many request sizes.
    ids, mask = (jnp.asarray(a) for a in left_pad(ids, mask, bucket(t_in)))
    b, t = ids.shape
    experts = self.experts_on_device()
    caches = self.init_caches(b, bucket(t + max_new_tokens))
    positions = prompt_positions(mask)
    forward, greedy = _programs()
    logits, caches = forward(self.graphdef, self.state, experts, ids, positions, mask, caches, 0)
    prompt = np.asarray(ids[:, t - t_in :])
    if max_new_tokens <= 0:
      return prompt
    # Bucketed output length: the decode loop compiles once for many max_new_tokens.
    new, _ = greedy(
      self.graphdef,
      bucket(max_new_tokens),
      self.state,
      experts,
      logits[:, -1:],
      caches,
      positions[:, -1:] + 1,
      t,
      max_new_tokens,
    )
    return np.concatenate([prompt, np.asarray(new)[:, :max_new_tokens]], axis=1)
