"""Sweep configs are checked on the host before anything loads: each bad field names `--config.FIELD` and the fix."""

import pytest

from moejax.eval import sweep
from tests.eval.test_configs import ROOT, load

SWEEP, ABLATION, DECODE = (ROOT / f"{name}.py" for name in ("sweep_alpha", "ablation", "decode"))

# (config file, override, the field the error names, words of the fix)
BAD = [
  (SWEEP, "--config.model=", "--config.model", "HuggingFace MoE checkpoint directory"),
  (SWEEP, "--config.model=/no/such/dir", "--config.model", "does not exist"),
  (SWEEP, "--config.dtype=int3", "--config.dtype", "use one of"),
  (SWEEP, "--config.policies=('smoe','smoe2')", "--config.policies", "choose one of"),
  (DECODE, "--config.policy=fifo", "--config.policy", "choose one of"),
  (SWEEP, "--config.alphas=(0.1,-0.2)", "--config.alphas", "number >= 0"),
  (SWEEP, "--config.alphas=(0.1,'a')", "--config.alphas", "number >= 0"),
  (ABLATION, "--config.alpha=-0.5", "--config.alpha", "number >= 0"),
  (SWEEP, "--config.engine.cache_fraction=0.0", "--config.engine.cache_fraction", "(0, 1]"),
  (SWEEP, "--config.engine.cache_fraction=1.5", "--config.engine.cache_fraction", "(0, 1]"),
  (SWEEP, "--config.engine.cache_slots=-1", "--config.engine.cache_slots", ">= 0"),
  (SWEEP, "--config.engine.costs=fast", "--config.engine.costs", "LOAD_S,CPU_S"),
  (SWEEP, "--config.engine.costs=0.1,-1", "--config.engine.costs", "positive seconds"),
  (SWEEP, "--config.engine.window=0", "--config.engine.window", "integer >= 1"),
  (SWEEP, "--config.engine.substitute_weight=mine", "--config.engine.substitute_weight", "use one of"),
  (SWEEP, "--config.engine.similarity=/no/sim.npz", "--config.engine.similarity", "existing path"),
  (SWEEP, "--config.speed.profiles=('rtx4060ti_16gb','rtx9090')", "--config.speed.profiles", "known profiles"),
  (SWEEP, "--config.speed.batch=0", "--config.speed.batch", "integer >= 1"),
  (SWEEP, "--config.speed.new_tokens=-4", "--config.speed.new_tokens", "integer >= 1"),
  (SWEEP, "--config.speed.prompt_len=-1", "--config.speed.prompt_len", "integer >= 1"),
  (SWEEP, "--config.speed.prompt_file=/no/prompts.txt", "--config.speed.prompt_file", "existing path"),
  (SWEEP, "--config.accuracy.batch_size=0", "--config.accuracy.batch_size", "integer >= 1"),
  (SWEEP, "--config.accuracy.limit=-1", "--config.accuracy.limit", "leave it unset"),
  (SWEEP, "--config.accuracy.perplexity_max_tokens=-8", "--config.accuracy.perplexity_max_tokens", ">= 1"),
  (SWEEP, "--config.accuracy.perplexity_context=256", "--config.accuracy.perplexity_context", "fewer tokens"),
  (SWEEP, "--config.accuracy.perplexity_mode=greedy", "--config.accuracy.perplexity_mode", "use one of"),
  (SWEEP, "--config.backend=spark", "--config.backend", "use one of ('local', 'ray')"),
  (ABLATION, "--config.ray.max_retries=-1", "--config.ray.max_retries", "integer >= 0"),
  (ABLATION, "--config.ray.num_gpus_per_point=-1", "--config.ray.num_gpus_per_point", "number >= 0"),
]


@pytest.mark.parametrize("path, override, field, fix", BAD, ids=[b[1].removeprefix("--config.") for b in BAD])
def test_bad_field_is_named_with_its_fix(path, override, field, fix):
  cfg = load(path, override)
  with pytest.raises(ValueError) as info:
    sweep.check_config(cfg)
  message = str(info.value)
  assert field in message and fix in message, message


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), True, None], ids=repr)
def test_alpha_must_be_a_finite_number(alpha):
  cfg = load(SWEEP)
  cfg.alphas = (0.0, alpha)  # values the command line cannot spell
  with pytest.raises(ValueError, match="--config.alphas.*not a number >= 0"):
    sweep.check_config(cfg)


def test_conflicting_cache_options_name_both_fields():
  cfg = load(SWEEP, "--config.engine.cache_slots=8", "--config.engine.cache_bytes=1000000")
  with pytest.raises(ValueError, match="at most one of") as info:
    sweep.check_config(cfg)
  assert "--config.engine.cache_slots=8" in str(info.value) and "--config.engine.cache_bytes=1000000" in str(info.value)
  assert "cache_fraction" not in str(info.value).split(":")[0]  # only the fields that are set are named


@pytest.mark.parametrize("path", [SWEEP, ABLATION, DECODE], ids=lambda p: p.stem)
def test_shipped_configs_pass(path):
  sweep.check_config(load(path))
  sweep.check_config(load(path, "--config.engine.cache_fraction=0.25", "--config.engine.costs=0.002,0.001"))


def test_sweep_checks_before_loading(monkeypatch, tmp_path):
  monkeypatch.setattr(sweep, "load_setup", lambda cfg: pytest.fail("loaded a model for a config that cannot run"))
  cfg = load(SWEEP, f"--config.out={tmp_path / 'r.jsonl'}", "--config.engine.cache_fraction=0")
  with pytest.raises(ValueError, match="--config.engine.cache_fraction"):
    sweep.sweep(cfg, [{"policy": "smoe", "alpha": 0.0}])
  assert not (tmp_path / "r.jsonl").exists()
