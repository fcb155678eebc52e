"""SMoE as the paper's text describes it (smoe) against its released code (smoe_release) and the baselines, each at
its own setting, with a cache per MoE layer and one pool shared by all layers (resumable JSONL, one row per point).

  python experiments/compare_policies.py --config=configs/compare_policies.py --config.engine.cache_fraction=0.25 \\
      --config.out=runs/compare_policies.jsonl

A cache fraction is of one layer's experts per layer, or of all routed experts for the shared pool: the same bytes.
"""

from moejax.eval.sweep import sweep_config


def get_config():
  c = sweep_config()
  # (policy, alpha): each at the setting it is published with. lru / mrs have no alpha; buddy's alpha is its
  # substitution tolerance (top-score experts, S > (1 + alpha) S_(k+1), are never replaced); cache_prior's strength
  # is log(1 + alpha) unless --config.engine.cache_prior_strength says otherwise; smoe_release ships 0.25.
  c.points = (("smoe", 0.3), ("smoe_release", 0.25), ("lru", 0.0), ("mrs", 0.0), ("buddy", 0.3), ("cache_prior", 0.3))
  c.scopes = ("layer", "global")
  c.out = "runs/compare_policies.jsonl"
  return c
