"""`moejax.load` holds a bf16 checkpoint once: peak memory of a load, measured in a fresh process.

The checkpoint (~50 MB, bf16, written by transformers' `save_pretrained`) is
loaded with routed experts in host memory. Peak resident memory (VmHWM,
reset after a warm-up load of the shipped model so that imports and one-time
compilations are not counted) may grow by at most 1.15x the checkpoint's
bytes plus `RUNTIME_SLACK`: what loading a model needs besides its weights
(the expert-row writes compiled for the new shapes, the expert in flight,
XLA's and Python's allocations while the decoder is built): the growth was
the checkpoint + ~8 MB here, and 1.04x for a 2.3 GB checkpoint.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from tests.models.hf_utils import randomize_

RUNTIME_SLACK = 16 * 2**20

_MEASURE = r"""
import json, sys
import moejax
from moejax.models.moe import value_dtype

def status(field):
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

moejax.load(moejax.default_model_path(), experts="host", progress=False)  # imports, compilations
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")  # resets VmHWM to the current resident size
base = status("VmRSS:")
model = moejax.load(sys.argv[1], experts="host", progress=False)
print(json.dumps({"peak_growth": status("VmHWM:") - base, "dtype": str(model.dtype),
                  "expert_dtype": str(value_dtype(model.experts[0].gate.dtype)),
                  "memory_kind": model.experts[0].gate.sharding.memory_kind}))
"""


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
  config = transformers.Qwen2MoeConfig(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    shared_expert_intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=4,
  )
  path = tmp_path_factory.mktemp("bf16_qwen2_moe")
  torch.manual_seed(0)
  model = randomize_(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32))
  model.to(torch.bfloat16).save_pretrained(path)
  return path


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS accounting")
def test_host_load_peak_memory_is_the_checkpoint_once(bf16_checkpoint):
  size = sum(os.path.getsize(bf16_checkpoint / f) for f in os.listdir(bf16_checkpoint) if f.endswith(".safetensors"))
  assert 40e6 < size < 80e6
  out = subprocess.run(
    [sys.executable, "-c", _MEASURE, str(bf16_checkpoint)],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["dtype"] == got["expert_dtype"] == "bfloat16"  # dtype=None keeps the checkpoint's own
  assert got["memory_kind"] == "pinned_host"
  assert got["peak_growth"] <= 1.15 * size + RUNTIME_SLACK, (got["peak_growth"] / size, size)
