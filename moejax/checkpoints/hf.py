"""HuggingFace checkpoint -> moejax parameters.

moejax's module tree mirrors the HF one, so the mapping is mechanical: a
parameter path such as `("layers", 3, "attn", "q_proj", "kernel")` becomes
`model.layers.3.self_attn.q_proj.weight` (transposed, since HF stores Linear
weights `[out, in]`). What differs between families is collected in one small
`Layout` per family: where the MoE block lives, what the router, the shared
experts and the expert projections are called.

Routed experts are read separately, per layer, into stacked host arrays
`[E, D, F]` / `[E, F, D]`, from either the hub layout
(`experts.{j}.gate_proj.weight`) or the fused transformers-5 layout
(`experts.gate_up_proj`, `experts.down_proj`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moejax.checkpoints.safetensors_io import CheckpointError, CheckpointReader
from moejax.models.config import MoEConfig


@dataclasses.dataclass(frozen=True)
class Layout:
  """The names one family uses in its state dict (below `model.layers.{i}.`)."""

  moe: str = "mlp"  # module holding router and experts
  router: str = "gate"
  router_bias: str = "gate.e_score_correction_bias"
  experts: str = "experts"
  expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
  shared: str = "shared_expert"
  shared_gate: str = "shared_expert_gate"
  attn: str = "self_attn"


LAYOUTS: dict[str, Layout] = {
    "qwen2_moe": Layout(),
    "qwen3_moe": Layout(),
    "olmoe": Layout(),
    "mixtral": Layout(moe="block_sparse_moe", expert_proj=("w1", "w3", "w2")),
    "deepseek_v2": Layout(shared="shared_experts"),
    "deepseek_v3": Layout(shared="shared_experts"),
    "deepseek": Layout(shared="shared_experts"),
    "xverse": Layout(router="router", shared="shared_experts"),
}


def layout_for(config: MoEConfig) -> Layout:
  return LAYOUTS.get(config.model_type, Layout())


def hf_key(path: tuple, layout: Layout, is_moe_layer: bool) -> tuple[str, bool]:
  """Maps a moejax parameter path to (HF tensor name, whether to transpose)."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  transpose = leaf == "kernel"
  suffix = "weight" if leaf in ("kernel", "weight") else leaf
  if parts[0] == "embed_tokens":
    return "model.embed_tokens.weight", False
  if parts[0] == "lm_head":
    return "lm_head.weight", True
  if parts[0] == "norm":
    return "model.norm.weight", False
  if parts[0] != "layers":
    raise KeyError(f"No HF name for parameter path {path}.")
  prefix = f"model.layers.{parts[1]}."
  mods = parts[2:-1]
  if mods[0] == "attn":
    mods = [layout.attn, *mods[1:]]
  elif mods[0] == "mlp" and is_moe_layer:
    if mods[1] == "router":
      if leaf == "bias":
        return prefix + f"{layout.moe}.{layout.router_bias}", False
      return prefix + f"{layout.moe}.{layout.router}.weight", True
    if mods[1:3] == ["shared", "gate"]:
      mods = [layout.moe, layout.shared_gate]
    elif mods[1:3] == ["shared", "mlp"]:
      mods = [layout.moe, layout.shared, *mods[3:]]
  return prefix + ".".join([*mods, suffix]), transpose


def read_param(reader: CheckpointReader, key: str, transpose: bool, shape: tuple[int, ...]) -> np.ndarray:
  """Reads one tensor, transposed to the moejax layout, checking its shape."""
  hf_shape = tuple(reversed(shape)) if transpose else tuple(shape)
  array = reader.get(key, hf_shape)
  return array.T if transpose else array


def read_experts(
    reader: CheckpointReader, config: MoEConfig, layer: int, dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Stacked routed experts of one layer as host arrays.

  Returns:
    gate `[E, D, F]`, up `[E, D, F]`, down `[E, F, D]` in `dtype`.
  """
  layout = layout_for(config)
  e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
  base = f"model.layers.{layer}.{layout.moe}.{layout.experts}"
  gate = np.empty((e, d, f), dtype)
  up = np.empty((e, d, f), dtype)
  down = np.empty((e, f, d), dtype)
  if f"{base}.gate_up_proj" in reader:  # fused transformers-5 layout
    gate_up = reader.get(f"{base}.gate_up_proj", (e, 2 * f, d))
    down_all = reader.get(f"{base}.down_proj", (e, d, f))
    for j in range(e):
      gate[j], up[j] = gate_up[j, :f].T, gate_up[j, f:].T
      down[j] = down_all[j].T
    return gate, up, down
  g_name, u_name, d_name = layout.expert_proj
  if f"{base}.0.{g_name}.weight" not in reader:
    raise CheckpointError(
        f"Routed experts of layer {layer} not found: expected {base}.0.{g_name}.weight "
        f"or {base}.gate_up_proj in {reader.path!r}."
    )
  for j in range(e):
    gate[j] = reader.get(f"{base}.{j}.{g_name}.weight", (f, d)).T
    up[j] = reader.get(f"{base}.{j}.{u_name}.weight", (f, d)).T
    down[j] = reader.get(f"{base}.{j}.{d_name}.weight", (d, f)).T
  return gate, up, down
