"""CPU-assisted expert computation: missed experts run on the host from host weights."""

from __future__ import annotations

import numpy as np

from moejax.models.moe import ExpertWeights


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


_ACTS = {"silu": _silu, "swish": _silu, "gelu_pytorch_tanh": _gelu_tanh, "relu": lambda x: np.maximum(x, 0)}


def cpu_experts(
    x: np.ndarray, weights: ExpertWeights, experts: np.ndarray, mix: np.ndarray, on_cpu: np.ndarray, act: str
) -> np.ndarray:
  """Weighted outputs of the (token, expert) pairs marked `on_cpu`, computed with numpy.

  Args:
    x: `[N, D]` token activations (host copy).
    weights: the layer's host experts `[E, ...]`.
    experts: `[N, k]` expert ids; mix: `[N, k]` mixing weights.
    on_cpu: `[N, k]` bool, pairs computed here.
    act: activation name.

  Returns:
    `[N, D]` float32: sum over the CPU pairs of mix * expert(x).
  """
  if act not in _ACTS:
    raise ValueError(f"CPU expert compute does not support hidden_act {act!r}; supported: {sorted(_ACTS)}.")
  out = np.zeros(x.shape, np.float32)
  x32 = x.astype(np.float32)
  for e in np.unique(experts[on_cpu]):
    tok, pos = np.nonzero(on_cpu & (experts == e))
    g, u, d = (np.asarray(a[e], np.float32) for a in weights)
    xe = x32[tok]
    y = (_ACTS[act](xe @ g) * (xe @ u)) @ d
    np.add.at(out, tok, mix[tok, pos, None].astype(np.float32) * y)
  return out
