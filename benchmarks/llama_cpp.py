"""llama.cpp as the CPU reference at the bandwidth limit: build `llama-bench`, convert a checkpoint, time it.

Benchmark-only (never imported by moejax, never run in CI). Everything lives
in a cache folder (default `~/.cache/moejax/llama_cpp`):
1. `pip download --no-binary :all: llama-cpp-python` fetches the source
   distribution, which vendors llama.cpp with `convert_hf_to_gguf.py`;
2. CMake builds only the `llama-bench` target (Release, native CPU; a few
   minutes on 2 cores, once);
3. the HF checkpoint is converted to GGUF (float32 or bfloat16);
4. `llama-bench` reports prompt and generation speed at a given thread count.

Workaround (benchmark only): the converter refuses BPE tokenizers whose
pre-tokenizer hash it does not know. The random benchmark checkpoint has no
tokenizer at all, so it is converted with the shipped default model's
byte-level BPE tokenizer, and the pre-tokenizer is declared "qwen2". Token
ids are only fed to the model (llama-bench draws random ids), so the
tokenizer does not affect the timing.

Second workaround: llama.cpp tells a DeepSeek-V2 checkpoint without a query
LoRA (V2-Lite) by its layer count (26 or 27) and otherwise requires the key
`q_lora_rank`, which the converter writes only when the config has one. The
conversion writes `q_lora_rank = 0` for such a config, which llama.cpp's
loader reads as "no query LoRA", so the 2-layer V2-Lite shape loads.

  python benchmarks/llama_cpp.py --checkpoint ~/.cache/moejax/bench_qwen2_moe_128m
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

CACHE = os.path.expanduser("~/.cache/moejax/llama_cpp")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Run in a subprocess with the vendored llama.cpp directory as cwd: patches the
# pre-tokenizer check and V2-Lite's q_lora_rank (see the module docstring), then runs the converter.
_CONVERT = """
import sys
sys.path.insert(0, '.')
sys.path.insert(1, 'gguf-py')
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'
from conversion import deepseek
_set_params = deepseek.DeepseekV2Model.set_gguf_parameters
def _with_q_lora_rank(self):
  _set_params(self)
  if self.hparams.get('q_lora_rank') is None:
    self.gguf_writer.add_q_lora_rank(0)
deepseek.DeepseekV2Model.set_gguf_parameters = _with_q_lora_rank
import convert_hf_to_gguf
sys.argv = ['convert_hf_to_gguf.py', sys.argv[1], '--outtype', sys.argv[3], '--outfile', sys.argv[2]]
convert_hf_to_gguf.main()
"""


def _run(cmd, log: str, **kw) -> None:
  with open(log, "w") as f:
    proc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, **kw)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}); see {log}")


def source_dir(cache: str = CACHE) -> str:
  """The vendored llama.cpp tree of the llama-cpp-python sdist (downloaded and unpacked once)."""
  found = sorted(glob.glob(os.path.join(cache, "llama_cpp_python-*", "vendor", "llama.cpp")))
  if found:
    return found[-1]
  os.makedirs(cache, exist_ok=True)
  print("downloading the llama-cpp-python source distribution ...", flush=True)
  _run(
    [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python", "-d", cache],
    os.path.join(cache, "download.log"),
  )
  (sdist,) = glob.glob(os.path.join(cache, "llama_cpp_python-*.tar.gz"))
  shutil.unpack_archive(sdist, cache)
  return source_dir(cache)


def build_llama_bench(cache: str = CACHE) -> str:
  """Path of the `llama-bench` binary, built once (Release, native CPU)."""
  src = source_dir(cache)
  binary = os.path.join(src, "build", "bin", "llama-bench")
  if not os.path.exists(binary):
    print("building llama-bench (a few minutes, once) ...", flush=True)
    _run(
      [
        "cmake",
        "-S",
        src,
        "-B",
        os.path.join(src, "build"),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
      ],
      os.path.join(cache, "cmake.log"),
    )
    _run(
      ["cmake", "--build", os.path.join(src, "build"), "--target", "llama-bench", "-j", str(os.cpu_count())],
      os.path.join(cache, "build.log"),
    )
  return binary


def convert(checkpoint: str, tokenizer_dir: str, cache: str = CACHE, outtype: str = "f32") -> str:
  """GGUF of `checkpoint` in `outtype` ("f32", "bf16"; cached by checkpoint name); tokenizer files from `tokenizer_dir`."""
  name = os.path.basename(os.path.normpath(checkpoint))
  out = os.path.join(cache, f"{name}.{outtype}.gguf")
  if os.path.exists(out):
    return out
  with tempfile.TemporaryDirectory() as tmp:
    for f in os.listdir(checkpoint):
      os.symlink(os.path.abspath(os.path.join(checkpoint, f)), os.path.join(tmp, f))
    for f in TOKENIZER_FILES:
      if not os.path.exists(os.path.join(tmp, f)):
        shutil.copy(os.path.join(tokenizer_dir, f), tmp)
    print(f"converting {checkpoint} to GGUF {outtype} ...", flush=True)
    _run(
      [sys.executable, "-c", _CONVERT, tmp, out + ".tmp", outtype],
      os.path.join(cache, f"convert_{name}.log"),
      cwd=source_dir(cache),
    )
  os.replace(out + ".tmp", out)
  return out


def bench(
  gguf: str, *, threads: int, prompt_tokens: int = 16, new_tokens: int = 32, repeats: int = 5, cache: str = CACHE
) -> dict:
  """llama-bench on `gguf`: {"ttft_s", "tpot_s", "tg_tokens_per_s", "pp_tokens_per_s", "build"}.

  TPOT is 1 / generation speed of `new_tokens` tokens (batch 1, from an
  empty context); TTFT is the prompt pass of `prompt_tokens` tokens.
  """
  out = subprocess.run(
    [
      build_llama_bench(cache),
      "-m",
      gguf,
      "-t",
      str(threads),
      "-p",
      str(prompt_tokens),
      "-n",
      str(new_tokens),
      "-r",
      str(repeats),
      "-o",
      "json",
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  if out.returncode:
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    raise RuntimeError(f"llama-bench failed on {os.path.basename(gguf)}: {' | '.join(errors[-2:]) or out.returncode}")
  rows = json.loads(out.stdout)
  (pp,) = [r for r in rows if r["n_prompt"] > 0]
  (tg,) = [r for r in rows if r["n_gen"] > 0]
  return {
    "ttft_s": prompt_tokens / pp["avg_ts"],
    "tpot_s": 1.0 / tg["avg_ts"],
    "tg_tokens_per_s": tg["avg_ts"],
    "pp_tokens_per_s": pp["avg_ts"],
    "build": f"{tg.get('build_commit', '?')} ({tg.get('cpu_info', '?')})",
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the shipped model's)")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()
  tokenizer = args.tokenizer
  if tokenizer is None:
    import moejax

    tokenizer = moejax.default_model_path()
  print(json.dumps(bench(convert(args.checkpoint, tokenizer), threads=args.threads), indent=2))


if __name__ == "__main__":
  main()
