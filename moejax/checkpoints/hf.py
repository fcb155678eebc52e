"""HuggingFace checkpoint -> moejax parameters.

moejax's module tree mirrors the HF one and keeps HF's `[out, in]` layout of
every matrix, so the mapping is mechanical: a parameter path such as
`("layers", 3, "attn", "q_proj", "weight")` becomes
`model.layers.3.self_attn.q_proj.weight`, read as it is stored. What differs
between families is collected in one small `Layout` per family: where the MoE
block lives, what the router, the shared experts and the expert projections
are called.

Routed experts are read separately, one expert at a time (`expert_tensors`),
from either the hub layout (`experts.{j}.gate_proj.weight`) or the fused
transformers-5 layout (`experts.gate_up_proj`, `experts.down_proj`); the
loader writes them into their final stacked arrays `[E, F, D]` / `[E, D, F]`.
"""

from __future__ import annotations

import dataclasses

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


def hf_key(path: tuple, layout: Layout, is_moe_layer: bool) -> str:
  """The HF tensor name of a moejax parameter path (stored in the same layout)."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  if parts[0] == "embed_tokens":
    return "model.embed_tokens.weight"
  if parts[0] == "lm_head":
    return "lm_head.weight"
  if parts[0] == "norm":
    return "model.norm.weight"
  if parts[0] != "layers":
    raise KeyError(f"No HF name for parameter path {path}.")
  prefix = f"model.layers.{parts[1]}."
  mods = parts[2:-1]
  if mods[0] == "attn":
    mods = [layout.attn, *mods[1:]]
  elif mods[0] == "mlp" and is_moe_layer:
    if mods[1] == "router":
      if leaf == "bias":
        return prefix + f"{layout.moe}.{layout.router_bias}"
      return prefix + f"{layout.moe}.{layout.router}.weight"
    if mods[1:3] == ["shared", "gate"]:
      mods = [layout.moe, layout.shared_gate]
    elif mods[1:3] == ["shared", "mlp"]:
      mods = [layout.moe, layout.shared, *mods[3:]]
  return prefix + ".".join([*mods, leaf])


def expert_tensors(reader: CheckpointReader, config: MoEConfig, layer: int, expert: int):
  """One routed expert of one layer as read from the checkpoint, in its stored dtype.

  Returns:
    gate `[F, D]`, up `[F, D]`, down `[D, F]` numpy arrays.
  """
  layout = layout_for(config)
  d, f = config.hidden_size, config.moe_intermediate_size
  base = f"model.layers.{layer}.{layout.moe}.{layout.experts}"
  if f"{base}.gate_up_proj" in reader:  # fused transformers-5 layout: [E, 2F, D] and [E, D, F]
    gate_up = reader.get(f"{base}.gate_up_proj", (config.num_experts, 2 * f, d), row=expert)
    return gate_up[:f], gate_up[f:], reader.get(f"{base}.down_proj", (config.num_experts, d, f), row=expert)
  g_name, u_name, d_name = layout.expert_proj
  if f"{base}.0.{g_name}.weight" not in reader:
    raise CheckpointError(
      f"Routed experts of layer {layer} not found: expected {base}.0.{g_name}.weight "
      f"or {base}.gate_up_proj in {reader.path!r}."
    )
  prefix = f"{base}.{expert}"
  return (
    reader.get(f"{prefix}.{g_name}.weight", (f, d)),
    reader.get(f"{prefix}.{u_name}.weight", (f, d)),
    reader.get(f"{prefix}.{d_name}.weight", (d, f)),
  )
