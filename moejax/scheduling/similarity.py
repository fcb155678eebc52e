"""Expert similarity matrices that rank substitutes (SPEC section 3).

Each function builds one layer's ``[E, E]`` matrix ``sim`` where
``sim[e, c]`` says how good a stand-in expert ``c`` is for expert ``e``
(higher is better). Routing only reads off-diagonal entries (a substitute is
never the expert it replaces); the diagonal is 1 by convention. Stack layers
into ``[L, E, E]`` for :func:`save_similarity`.

Sources (:data:`SIMILARITY_SOURCES`):

- ``"router"``: cosine of the experts' router (gate) weight rows.
- ``"weight"``: cosine of the experts' flattened FFN weights. Meaningful for
  experts that share an origin (upcycled from one dense FFN); independently
  trained experts differ by a permutation of their hidden units.
- ``"output"``: cosine of the experts' outputs on calibration tokens,
  averaged over tokens.
- ``"coactivation"``: how often the router selects ``c`` together with ``e``.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

SIMILARITY_SOURCES = ("router", "weight", "output", "coactivation")

ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
}

_EPS = 1e-12


def _with_unit_diagonal(sim: jax.Array) -> jax.Array:
  return jnp.where(jnp.eye(sim.shape[-1], dtype=bool), 1.0, sim)


def _cosine_from_gram(gram: jax.Array) -> jax.Array:
  """``[E, E]`` Gram matrix -> cosine; zero vectors get cosine 0."""
  norm = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  cos = gram / jnp.maximum(norm[:, None] * norm[None, :], _EPS)
  return _with_unit_diagonal(cos)


def router_cosine(router_w: jax.Array) -> jax.Array:
  """Cosine similarity of router weight rows.

  Args:
    router_w: ``[E, D]`` router weight (one row per expert, as in the HF
      ``gate.weight``).

  Returns:
    ``[E, E] float32``; 0 against an all-zero row, diagonal 1.
  """
  w = router_w.astype(jnp.float32)
  return _cosine_from_gram(w @ w.T)


def expert_weight_cosine(w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Cosine similarity of the experts' concatenated, flattened weights.

  Args:
    w_gate: ``[E, F, D]`` gate projections.
    w_up: ``[E, F, D]`` up projections.
    w_down: ``[E, D, F]`` down projections.

  Returns:
    ``[E, E] float32``; 0 against an all-zero expert, diagonal 1.
  """
  gram = sum(jnp.einsum("e...,g...->eg", w.astype(jnp.float32), w.astype(jnp.float32)) for w in (w_gate, w_up, w_down))
  return _cosine_from_gram(gram)


def expert_outputs(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act: str = "silu") -> jax.Array:
  """Every expert's gated-FFN output on every token.

  Args:
    x: ``[N, D]`` tokens.
    w_gate, w_up: ``[E, F, D]``; w_down: ``[E, D, F]``.
    act: activation name, one of :data:`ACTIVATIONS`.

  Returns:
    ``[E, N, D] float32``,
    ``y[e] = (act(x W_gate[e]) * (x W_up[e])) W_down[e]``.
  """
  if act not in ACTIVATIONS:
    raise ValueError(f"unknown activation {act!r}; choose one of {tuple(ACTIVATIONS)}.")
  x, w_gate, w_up, w_down = (a.astype(jnp.float32) for a in (x, w_gate, w_up, w_down))
  hidden = ACTIVATIONS[act](jnp.einsum("nd,efd->enf", x, w_gate)) * jnp.einsum("nd,efd->enf", x, w_up)
  return jnp.einsum("enf,edf->end", hidden, w_down)


def expert_output_similarity(
  x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, act: str = "silu", *, chunk: int = 64
) -> jax.Array:
  """Per-token cosine of the experts' outputs, averaged over tokens.

  Args:
    x: ``[N, D]`` calibration tokens (hidden states entering the layer's
      experts, i.e. after the post-attention norm).
    w_gate, w_up: ``[E, F, D]``; w_down: ``[E, D, F]``.
    act: activation name, one of :data:`ACTIVATIONS`.
    chunk: tokens processed at once (bounds memory at ``E * chunk * D``).

  Returns:
    ``[E, E] float32`` mean over tokens of ``cos(y_e(x_n), y_c(x_n))``; a
    zero output counts as cosine 0; diagonal 1.
  """
  num_tokens = x.shape[0]
  if num_tokens == 0:
    raise ValueError("expert_output_similarity needs at least one token.")
  pad = -num_tokens % chunk
  # Zero tokens give zero outputs, whose cosine counts 0 in the sum.
  chunks = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[1])

  def add_chunk(total, xs):
    y = expert_outputs(xs, w_gate, w_up, w_down, act)
    y = y / jnp.maximum(jnp.linalg.norm(y, axis=-1, keepdims=True), _EPS)
    return total + jnp.einsum("end,gnd->eg", y, y), None

  num_experts = w_gate.shape[0]
  total, _ = jax.lax.scan(add_chunk, jnp.zeros((num_experts, num_experts), jnp.float32), chunks)
  return _with_unit_diagonal(total / num_tokens)


def coactivation(selected: jax.Array, num_experts: int) -> jax.Array:
  """Co-selection frequency from routing traces.

  Args:
    selected: ``[N, k] int32`` experts selected per token (-1 entries are
      ignored).
    num_experts: ``E``.

  Returns:
    ``[E, E] float32`` with ``sim[e, c]`` the fraction of tokens selecting
    ``e`` that also select ``c`` (an estimate of ``P(c | e)``; not
    symmetric; rows of never-selected experts are 0), diagonal 1.
  """
  index = jnp.where(selected >= 0, selected, num_experts)
  onehot = (
    jnp.zeros((selected.shape[0], num_experts), jnp.float32)
    .at[jnp.arange(selected.shape[0])[:, None], index]
    .set(1.0, mode="drop")
  )
  counts = onehot.T @ onehot
  freq = counts / jnp.maximum(jnp.diagonal(counts), 1.0)[:, None]
  return _with_unit_diagonal(freq)


_BUILDERS = {
  "router": router_cosine,
  "weight": expert_weight_cosine,
  "output": expert_output_similarity,
  "coactivation": coactivation,
}


def build(source: str, *args, **kwargs) -> jax.Array:
  """One layer's ``[E, E]`` similarity from the named source.

  ``build("router", router_w)``, ``build("weight", w_gate, w_up, w_down)``,
  ``build("output", x, w_gate, w_up, w_down, act=...)``,
  ``build("coactivation", selected, num_experts)``.
  """
  if source not in _BUILDERS:
    raise ValueError(f"unknown similarity source {source!r}; choose one of {SIMILARITY_SOURCES}.")
  return _BUILDERS[source](*args, **kwargs)


def save_similarity(path: str | os.PathLike, sim, meta: dict) -> None:
  """Writes per-layer similarity matrices to an ``.npz`` file.

  Args:
    path: file to write (written as given, no suffix added).
    sim: ``[L, E, E]`` matrices, one per MoE layer.
    meta: JSON-serialisable description (model, source, calibration data).
  """
  sim = np.asarray(sim, np.float32)
  if sim.ndim != 3 or sim.shape[1] != sim.shape[2]:
    raise ValueError(f"sim must have shape [L, E, E] (got {sim.shape}); stack one [E, E] matrix per layer.")
  try:
    meta_json = json.dumps(meta)
  except TypeError as err:
    raise TypeError(f"meta must be JSON-serialisable (plain str, numbers, lists, dicts): {err}") from err
  with open(path, "wb") as f:
    np.savez(f, sim=sim, meta=np.array(meta_json))


def load_similarity(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
  """Reads a file written by :func:`save_similarity`.

  Returns:
    ``(sim, meta)``: ``[L, E, E] float32`` numpy array and the meta dict.
  """
  with np.load(path, allow_pickle=False) as data:
    return data["sim"], json.loads(str(data["meta"]))
