"""Reading HuggingFace safetensors checkpoints one tensor (or one row of a tensor) at a time.

The safetensors format is an 8-byte little-endian header length, a JSON
header (`name -> {dtype, shape, data_offsets}`) and the raw tensor bytes. We
parse the header ourselves and read each tensor on request with positional
reads into a fresh array, so bfloat16 works without torch (via `ml_dtypes`)
and nothing of the file stays in the process: pages of a memory-mapped file
that were read count in its resident memory for as long as the file is
mapped, which would add up to the whole checkpoint while a model loads.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt or does not match its config."""


def _read_header(path: str) -> tuple[dict, int]:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path} is truncated (no safetensors header); re-download the checkpoint.")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CheckpointError(f"{path} has a corrupt safetensors header; re-download the checkpoint.")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download the checkpoint.") from e
  header.pop("__metadata__", None)
  data_start = 8 + n
  for name, info in header.items():
    end = info["data_offsets"][1]
    if data_start + end > size:
      raise CheckpointError(
        f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} of {size}; re-download it."
      )
  return header, data_start


class CheckpointReader:
  """Access by name to the tensors of a checkpoint directory, read when asked for.

  Accepts a single `model.safetensors`, any set of `*.safetensors` files, or a
  sharded checkpoint with `model.safetensors.index.json`.
  """

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"Checkpoint directory {path!r} does not exist.")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    if not files:
      raise CheckpointError(
        f"No *.safetensors weights in {path!r}. Convert PyTorch .bin weights with "
        "`model.save_pretrained(dir, safe_serialization=True)` first."
      )
    self.path = path
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise CheckpointError(f"Shard {name} listed in the index is missing from {path!r}.")
      header, start = _read_header(file)
      for key, info in header.items():
        self._where[key] = (file, info, start)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def keys(self) -> Iterator[str]:
    return iter(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entry(key)[1]["shape"])

  def dtype(self, key: str) -> np.dtype:
    """The stored dtype of tensor `key`."""
    name = self._entry(key)[1]["dtype"]
    if name not in _DTYPES:
      raise CheckpointError(f"Tensor {key!r} has unsupported dtype {name}.")
    return np.dtype(_DTYPES[name])

  def _entry(self, key: str):
    if key not in self._where:
      raise CheckpointError(f"Tensor {key!r} is missing from the checkpoint at {self.path!r}.")
    return self._where[key]

  def get(self, key: str, shape: tuple[int, ...] | None = None, *, row: int | None = None) -> np.ndarray:
    """The tensor `key` (checked against `shape`) as a new array, or only its slice `[row]` along the first axis."""
    file, info, start = self._entry(key)
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"Tensor {key!r} has unsupported dtype {info['dtype']}.")
    full = tuple(info["shape"])
    if shape is not None and full != tuple(shape):
      raise CheckpointError(
        f"Tensor {key!r} has shape {full}, but the config implies {tuple(shape)}; "
        "config.json and the weights do not belong together."
      )
    begin = start + info["data_offsets"][0]
    out_shape = full
    if row is not None:
      out_shape = full[1:]
      begin += row * int(np.prod(out_shape, dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
    array = np.empty(out_shape, _DTYPES[info["dtype"]])
    buffer = memoryview(array.reshape(-1).view(np.uint8))
    with open(file, "rb", buffering=0) as f:
      done = 0
      while done < len(buffer):  # a single read returns at most ~2 GB
        n = os.preadv(f.fileno(), [buffer[done:]], begin + done)
        if n == 0:
          raise CheckpointError(f"{file} ended inside tensor {key!r}; re-download the checkpoint.")
        done += n
    return array
