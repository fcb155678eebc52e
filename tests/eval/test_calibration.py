"""Similarity matrices of a loaded model, from every source."""

import numpy as np
import pytest

from moejax.eval import calibration
from moejax.scheduling import SIMILARITY_SOURCES, similarity

IDS = np.arange(24).reshape(2, 12) % 300


@pytest.mark.parametrize("source", SIMILARITY_SOURCES)
def test_build_similarity_shapes(host_model, source):
  c = host_model.config
  sim = calibration.build_similarity(host_model, source, calibration_ids=IDS, new_tokens=2)
  assert sim.shape == (len(c.moe_layer_ids), c.num_experts, c.num_experts)
  np.testing.assert_allclose(np.diagonal(sim, axis1=1, axis2=2), 1.0)


def test_router_source_is_the_engine_default(host_model):
  l = host_model.config.moe_layer_ids[0]
  want = similarity.router_cosine(host_model.decoder.layers[l].mlp.router.weight[...])
  np.testing.assert_allclose(calibration.build_similarity(host_model, "router")[0], want, atol=1e-6)


def test_recorded_routing_is_the_resident_top_k(host_model, resident_model):
  """The co-activation trace holds the model's own top-k for every prompt and generated token."""
  routing = calibration.routed_experts(host_model, IDS, new_tokens=3)
  c = host_model.config
  assert {l: r.shape for l, r in routing.items()} == {
    l: (IDS.size + 2 * 2, c.num_experts_per_tok) for l in c.moe_layer_ids
  }
  xs = calibration.expert_inputs(resident_model, IDS)
  l = c.moe_layer_ids[0]
  scores = np.asarray(resident_model.decoder.layers[l].router_scores(xs[l]))
  top = np.sort(np.argsort(-scores, axis=-1)[:, : c.num_experts_per_tok], axis=-1)
  np.testing.assert_array_equal(np.sort(routing[l][: IDS.size], axis=-1), top)
