"""Every experiment config loads through config_flags, and --config.x=y overrides apply."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).parents[2] / "configs"
CONFIGS = [ROOT / f"{name}.py" for name in ("decode", "sweep_alpha", "ablation", "choose_alpha", "similarity", "plot")]


def load(path, *overrides):
  argv = ["prog", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  # config_flags finds the override flags in sys_argv (sys.argv when run from the shell).
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_documents_its_command(path):
  cfg = load(path)
  module_doc = path.read_text().split('"""')[1]
  assert f"experiments/{path.stem}.py --config=configs/{path.name}" in module_doc.replace("\\\n", "")
  assert cfg.to_dict()


def test_overrides():
  cfg = load(
    ROOT / "sweep_alpha.py",
    "--config.alphas=(0.0,0.3)",
    "--config.engine.cache_slots=4",
    "--config.model=/m",
    "--config.accuracy.limit=10",
  )
  assert (cfg.alphas, cfg.engine.cache_slots, cfg.model, cfg.accuracy.limit) == ((0.0, 0.3), 4, "/m", 10)
  assert load(ROOT / "choose_alpha.py", "--config.budget_ms=12.5").budget_ms == 12.5
