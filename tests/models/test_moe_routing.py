"""The models' own top-k rules (`select_experts`, `combine_weights`) on hand-worked scores."""

import numpy as np
import pytest

from moejax.models.config import MoEConfig
from moejax.models.moe import combine_weights, select_experts


def _config(**routing) -> MoEConfig:
  return MoEConfig(
    model_type="test",
    vocab_size=8,
    hidden_size=4,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=4,
    moe_layers=(True,),
    sliding_windows=(None,),
    **routing,
  )


def _chosen(config, scores, bias=None) -> list[set[int]]:
  idx = select_experts(config, np.asarray(scores, np.float32), None if bias is None else np.asarray(bias, np.float32))
  return [set(row.tolist()) for row in np.asarray(idx)]


def test_greedy_is_plain_top_k():
  c = _config(num_experts=4, num_experts_per_tok=2)
  assert _chosen(c, [[0.1, 0.4, 0.3, 0.2]]) == [{1, 2}]


def test_group_limited_greedy_scores_groups_by_their_best_expert():
  # Groups {0,1} {2,3} {4,5}: best experts 0.30, 0.25, 0.20. Keeping one group forbids expert 2
  # although it beats expert 1.
  c = _config(num_experts=6, num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=3, topk_group=1)
  assert _chosen(c, [[0.30, 0.02, 0.25, 0.23, 0.20, 0.0]]) == [{0, 1}]


def test_noaux_tc_selects_on_biased_scores_with_top2_group_sums():
  # Biased scores [0.5, 0.1 | 0.4, 0.35]: group sums 0.6 and 0.75, so group {2,3} wins although
  # expert 0 is the best single expert.
  c = _config(num_experts=4, num_experts_per_tok=2, topk_method="noaux_tc", n_group=2, topk_group=1)
  assert _chosen(c, [[0.4, 0.3, 0.3, 0.3]], bias=[0.1, -0.2, 0.1, 0.05]) == [{2, 3}]


def test_noaux_tc_masks_dropped_groups_with_minus_infinity():
  # The kept group's biased scores are negative; a 0.0 fill (the original remote code) would pick
  # the dropped group's experts instead. transformers uses -inf.
  c = _config(num_experts=4, num_experts_per_tok=2, topk_method="noaux_tc", n_group=2, topk_group=1)
  assert _chosen(c, [[0.1, 0.1, 0.05, 0.05]], bias=[-0.5, -0.5, -0.6, -0.6]) == [{0, 1}]


def test_combine_weights_normalise_then_scale():
  scores = np.array([[0.2, 0.6]], np.float32)
  c = _config(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=2.5)
  np.testing.assert_allclose(combine_weights(c, scores), [[0.625, 1.875]], rtol=1e-6)
  c = _config(num_experts=4, num_experts_per_tok=2, routed_scaling_factor=2.5)
  np.testing.assert_allclose(combine_weights(c, scores), [[0.5, 1.5]], rtol=1e-6)


@pytest.mark.parametrize("method", ["group_limited_greedy", "noaux_tc"])
def test_groups_that_leave_too_few_experts_are_rejected(method):
  with pytest.raises(ValueError, match="fewer than num_experts_per_tok=3"):
    _config(num_experts=4, num_experts_per_tok=3, topk_method=method, n_group=2, topk_group=1)
  with pytest.raises(ValueError, match="does not divide"):
    _config(num_experts=6, num_experts_per_tok=2, topk_method=method, n_group=4, topk_group=2)
