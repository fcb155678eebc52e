#!/usr/bin/env bash
# GPU readiness in one script (about 8 minutes on a GPU machine), from the repository root:
#   1. installs the CUDA build of the jax version in use;
#   2. runs the lossless and device-memory tests of the engine on the GPU backend;
#   3. checks the peak device memory of an offloaded decode against non-expert weights + slots + one layer,
#      and prints host->device GB/s of the engine's slot fill against a plain device_put (benchmarks/gpu_check.py);
#   4. runs the scale benchmark's engine rows (experts in pinned_host memory) on the 2-layer A2.7B shape, bf16.
#
#   bash benchmarks/gpu_check.sh             # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU, tiny settings: the same steps, no install (CI runs this)
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-benchmarks/results}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT"

if [[ $DRY_RUN == 1 ]]; then
  export JAX_PLATFORMS=cpu
  TESTS=(tests/engine/test_memory.py::test_device_decode_memory_is_flat_across_calls)
  CHECKPOINT=moejax/assets/default_moe
  SCALE_ARGS=(--models tiny --dtypes float32 --policies lru --no-transformers --no-llama_cpp --no-prompt --no-cache_check
              --out "$OUT/gpu_check_scale_dry_run.json")
  echo "== dry run on CPU: skipping: $PYTHON -m pip install -U \"jax[cuda12]==<installed jax version>\""
else
  JAX_VERSION="$($PYTHON -c 'import jax; print(jax.__version__)')"
  echo "== installing jax[cuda12]==$JAX_VERSION"
  $PYTHON -m pip install -q -U "jax[cuda12]==$JAX_VERSION"
  export JAX_PLATFORMS=cuda
  $PYTHON -c 'import jax; assert jax.default_backend() == "gpu", jax.devices(); print(jax.devices())'
  TESTS=(tests/engine -k "lossless or memory")
  CHECKPOINT="$($PYTHON -c 'import sys; sys.path.insert(0, "benchmarks"); import scale
print(scale.checkpoint("qwen_a27b_2l", "bfloat16"))')"
  SCALE_ARGS=(--models qwen_a27b_2l --dtypes bfloat16 --policies resident,lru,smoe --no-transformers --no-llama_cpp
              --no-prompt --no-cache_check --out "$OUT/scale_gpu.json")
fi

echo "== engine tests on $JAX_PLATFORMS"
$PYTHON -m pytest -q -p no:cacheprovider "${TESTS[@]}"

echo "== device memory and slot-fill copy speed ($CHECKPOINT)"
$PYTHON benchmarks/gpu_check.py --checkpoint "$CHECKPOINT" | tee "$OUT/gpu_check.log"

echo "== scale benchmark, experts in pinned_host"
$PYTHON benchmarks/scale.py "${SCALE_ARGS[@]}"
