"""Next-token choice: greedy, or temperature / nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import validation


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
  """logits `[B, V]` -> tokens `[B]` int32. temperature 0 is greedy; both options are static Python numbers."""
  temperature, top_p = validation.sampling_options(temperature, top_p)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def emit(logits: jax.Array, key: jax.Array, forced: jax.Array | None, *, temperature: float, top_p: float):
  """Picks the next tokens `[B]` (forced, or sampled from logits `[B, V]`).

  Returns (token `[B]`, its log-probability `[B]`, whether it is the argmax `[B]`, the next key).
  """
  key, sub = jax.random.split(key)
  token = forced if forced is not None else sample(logits, sub, temperature=temperature, top_p=top_p)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp, jnp.argmax(logits, axis=-1) == token, key
