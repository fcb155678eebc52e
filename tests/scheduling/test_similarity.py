"""Tests of moejax.scheduling.similarity against brute-force numpy."""

import numpy as np
import pytest

from moejax.scheduling import similarity


def cosine(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def brute_cosine_matrix(vectors):
  n = len(vectors)
  return np.array([[1.0 if i == j else cosine(vectors[i], vectors[j]) for j in range(n)] for i in range(n)])


def silu(x):
  return x / (1 + np.exp(-x))


RNG = np.random.default_rng(0)
E, D, F, N = 5, 6, 4, 7
# The checkpoint layout, [out, in]: gate/up [E, F, D], down [E, D, F].
W_GATE = RNG.normal(size=(E, F, D)).astype(np.float32)
W_UP = RNG.normal(size=(E, F, D)).astype(np.float32)
W_DOWN = RNG.normal(size=(E, D, F)).astype(np.float32)


def test_router_cosine():
  w = RNG.normal(size=(E, D)).astype(np.float32)
  w[2] = 0  # a dead expert: cosine 0 to every other, 1 to itself
  sim = similarity.router_cosine(w)
  np.testing.assert_allclose(sim, brute_cosine_matrix(w), atol=1e-6)
  np.testing.assert_array_equal(np.diag(sim), 1.0)


def test_expert_weight_cosine():
  flat = [np.concatenate([W_GATE[e].ravel(), W_UP[e].ravel(), W_DOWN[e].ravel()]) for e in range(E)]
  sim = similarity.expert_weight_cosine(W_GATE, W_UP, W_DOWN)
  np.testing.assert_allclose(sim, brute_cosine_matrix(flat), atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 64])  # padded last chunk / one chunk
def test_expert_output_similarity(chunk):
  x = RNG.normal(size=(N, D)).astype(np.float32)
  outputs = [[W_DOWN[e] @ (silu(W_GATE[e] @ x[n]) * (W_UP[e] @ x[n])) for n in range(N)] for e in range(E)]
  expected = np.array(
    [[np.mean([cosine(outputs[e][n], outputs[c][n]) for n in range(N)]) for c in range(E)] for e in range(E)]
  )
  np.fill_diagonal(expected, 1.0)
  sim = similarity.expert_output_similarity(x, W_GATE, W_UP, W_DOWN, chunk=chunk)
  np.testing.assert_allclose(sim, expected, atol=1e-5)


def test_coactivation():
  # Tokens select {0, 1}, {0, 2}, {0, 1}, {3, -1 (padding)}.
  selected = np.array([[0, 1], [0, 2], [0, 1], [3, -1]], np.int32)
  sim = np.asarray(similarity.coactivation(selected, 5))
  # Expert 0 is selected 3 times, with 1 twice and 2 once.
  np.testing.assert_allclose(sim[0], [1, 2 / 3, 1 / 3, 0, 0])
  # Expert 1 (2 times) always with 0; expert 4 never selected.
  np.testing.assert_allclose(sim[1], [1, 1, 0, 0, 0])
  np.testing.assert_allclose(sim[4], [0, 0, 0, 0, 1])
  np.testing.assert_allclose(sim[3], [0, 0, 0, 1, 0])


def test_build_dispatches_and_rejects_unknown():
  w = RNG.normal(size=(E, D)).astype(np.float32)
  np.testing.assert_array_equal(similarity.build("router", w), similarity.router_cosine(w))
  with pytest.raises(ValueError, match="'coactivation'"):
    similarity.build("attention", w)
  with pytest.raises(ValueError, match="activation"):
    similarity.expert_output_similarity(w, W_GATE, W_UP, W_DOWN, act="tanh")


def test_save_load_roundtrip(tmp_path):
  sim = RNG.random((3, E, E)).astype(np.float32)
  meta = {"source": "router", "model": "tiny", "layers": [1, 2, 3]}
  path = tmp_path / "sim.npz"
  similarity.save_similarity(path, sim, meta)
  loaded, loaded_meta = similarity.load_similarity(path)
  np.testing.assert_array_equal(loaded, sim)
  assert loaded_meta == meta
  with pytest.raises(ValueError, match=r"\[L, E, E\]"):
    similarity.save_similarity(path, sim[0], meta)
  with pytest.raises(TypeError, match="JSON"):
    similarity.save_similarity(path, sim, {"x": object()})
