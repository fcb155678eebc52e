"""One configuration dataclass for every supported MoE family.

`MoEConfig` is frozen and hashable so that it can be a static argument of
`jax.jit`. `from_hf_config` maps a HuggingFace `config.json` dictionary onto
it; each family's quirks (which layers are dense, how routing normalises,
which attention variant) are resolved here once, so the model code only reads
uniform fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


class UnsupportedModelError(ValueError):
  """Raised for a checkpoint whose `model_type` moejax cannot run."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Architecture of a decoder-only MoE language model.

  Attributes are grouped as: shapes, attention, feed-forward layout and
  routing. Per-layer attributes are tuples of length `num_layers`.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"

  # Attention.
  attention_type: str = "gqa"  # "gqa" (MHA/GQA/MQA) or "mla" (DeepSeek-V2/V3)
  attention_bias: bool = False  # bias on q/k/v projections
  qk_norm: str | None = None  # None, "head" (per head, Qwen3) or "full" (whole projection, OLMoE)
  clip_qkv: float | None = None
  sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF rope dict
  max_position_embeddings: int = 4096  # "dynamic" rope rescales beyond this length
  rope_interleave: bool = False  # DeepSeek MLA: rope on interleaved (even, odd) pairs
  # Multi-head latent attention (DeepSeek-V2/V3).
  q_lora_rank: int | None = None
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0

  # Feed-forward layout.
  moe_layers: tuple[bool, ...] = ()  # per layer: True = MoE block, False = dense MLP
  intermediate_size: int = 0  # dense MLP width
  moe_intermediate_size: int = 0  # one routed expert's width
  num_experts: int = 0
  num_experts_per_tok: int = 0
  shared_intermediate_size: int = 0  # total width of the shared expert(s); 0 = none
  shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert output

  # Routing.
  scoring_func: str = "softmax"  # "softmax" or "sigmoid"
  topk_method: str = "greedy"  # "greedy", "group_limited_greedy" or "noaux_tc"
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = False
  routed_scaling_factor: float = 1.0
  router_bias: bool = False  # DeepSeek-V3 e_score_correction_bias (selection only)
  router_fp32: bool = False  # DeepSeek-V2/V3: router weight and logits stay float32 in any model dtype

  def __post_init__(self):
    if len(self.moe_layers) != self.num_layers:
      raise ValueError(f"moe_layers has {len(self.moe_layers)} entries, expected num_layers={self.num_layers}")
    if len(self.sliding_windows) != self.num_layers:
      raise ValueError(
        f"sliding_windows has {len(self.sliding_windows)} entries, expected num_layers={self.num_layers}"
      )
    if self.topk_method in ("group_limited_greedy", "noaux_tc") and self.num_experts:
      if self.num_experts % self.n_group:
        raise ValueError(f"n_group={self.n_group} does not divide num_experts={self.num_experts}.")
      if self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok:
        raise ValueError(
          f"topk_group={self.topk_group} of n_group={self.n_group} groups leave fewer than "
          f"num_experts_per_tok={self.num_experts_per_tok} experts to choose from."
        )
    rope_type = (self.rope_scaling_dict or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise UnsupportedModelError(
        f"Unsupported rope_type {rope_type!r}; moejax supports: {', '.join(SUPPORTED_ROPE_TYPES)}."
      )

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    """Indices of the layers with a routed-expert block."""
    return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

  @property
  def rope_dim(self) -> int:
    """Number of channels per head that rotary embeddings act on."""
    return self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def expert_param_count(self) -> int:
    """Parameters of one routed expert (gate, up and down projections)."""
    return 3 * self.hidden_size * self.moe_intermediate_size


# ----------------------------------------------------------------------------
# HuggingFace config.json -> MoEConfig
# ----------------------------------------------------------------------------


def load_hf_config_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads `config.json` from a checkpoint directory."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"Checkpoint path {path!r} does not exist.")
  config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
      f"No config.json in {path!r}: pass the directory of a HuggingFace checkpoint "
      "(the folder holding config.json and *.safetensors)."
    )
  with open(config_path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path} is not valid JSON ({e}); re-download or re-export the checkpoint.") from e


def _rope(d: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
  """Returns (rope_theta, rope scaling items) from either config convention.

  transformers >= 5 writes `rope_parameters` (holding `rope_theta` and
  `rope_type`); older hub configs write `rope_theta` and `rope_scaling`
  (`type` for `rope_type`). As transformers does, yarn gets
  `original_max_position_embeddings` (a top-level value wins, else
  `max_position_embeddings`) and, without a `factor`, the ratio
  `max_position_embeddings / original_max_position_embeddings`.
  """
  params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
  legacy_type = params.pop("type", None)
  rope_type = params.pop("rope_type", None) or legacy_type or "default"
  if rope_type == "default":
    return theta, None
  params["rope_type"] = rope_type
  if rope_type == "yarn":
    max_pos = d.get("max_position_embeddings")
    orig = d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    params["original_max_position_embeddings"] = orig
    if params.get("factor") is None:
      params["factor"] = max_pos / orig
  return theta, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


def _windows(d: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
  """Per-layer sliding window sizes, following each family's config rules."""
  window = d.get("sliding_window")
  if d.get("use_sliding_window") is False:
    window = None
  layer_types = d.get("layer_types")
  if layer_types is not None:
    return tuple(window if t == "sliding_attention" and window else None for t in layer_types)
  return tuple(window or None for _ in range(num_layers))


def _common(d: Mapping[str, Any], model_type: str, **overrides) -> dict[str, Any]:
  """Fields every family reads the same way; `overrides` replace them."""
  num_heads = d["num_attention_heads"]
  hidden = d["hidden_size"]
  theta, scaling = _rope(d)
  num_layers = d["num_hidden_layers"]
  fields = dict(
    model_type=model_type,
    vocab_size=d["vocab_size"],
    hidden_size=hidden,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=d.get("num_key_value_heads") or num_heads,
    head_dim=d.get("head_dim") or hidden // num_heads,
    rms_norm_eps=d.get("rms_norm_eps", 1e-6),
    tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    hidden_act=d.get("hidden_act", "silu"),
    rope_theta=theta,
    rope_scaling=scaling,
    max_position_embeddings=d.get("max_position_embeddings") or 4096,
    sliding_windows=_windows(d, num_layers),
  )
  fields.update(overrides)
  return fields


def _qwen_moe_layers(d: Mapping[str, Any]) -> tuple[bool, ...]:
  """Qwen2/3-MoE: MoE unless listed in mlp_only_layers or off the sparse step."""
  mlp_only = set(d.get("mlp_only_layers") or ())
  step = d.get("decoder_sparse_step", 1) or 1
  n_exp = d.get("num_experts", 0)
  return tuple(i not in mlp_only and n_exp > 0 and (i + 1) % step == 0 for i in range(d["num_hidden_layers"]))


def _deepseek_moe_layers(d: Mapping[str, Any], honour_freq: bool) -> tuple[bool, ...]:
  """DeepSeek families: MoE from layer `first_k_dense_replace` on.

  DeepSeek-MoE (v1) also requires `layer % moe_layer_freq == 0` (absolute
  index). transformers' DeepSeek-V2/V3 never read `moe_layer_freq` (every
  released checkpoint has 1), so `honour_freq` is False for them.
  """
  first_dense = d.get("first_k_dense_replace") or 0
  freq = (d.get("moe_layer_freq") or 1) if honour_freq else 1
  has_experts = d.get("n_routed_experts") is not None
  return tuple(has_experts and i >= first_dense and i % freq == 0 for i in range(d["num_hidden_layers"]))


def _from_qwen2_moe(d):
  return MoEConfig(
    **_common(d, "qwen2_moe"),
    attention_bias=bool(d.get("qkv_bias", True)),
    moe_layers=_qwen_moe_layers(d),
    intermediate_size=d["intermediate_size"],
    moe_intermediate_size=d["moe_intermediate_size"],
    num_experts=d["num_experts"],
    num_experts_per_tok=d["num_experts_per_tok"],
    shared_intermediate_size=d.get("shared_expert_intermediate_size", 0) or 0,
    shared_expert_gate=True,
    norm_topk_prob=bool(d.get("norm_topk_prob", False)),
  )


def _from_qwen3_moe(d):
  return MoEConfig(
    **_common(d, "qwen3_moe"),
    attention_bias=bool(d.get("attention_bias", False)),
    qk_norm="head",
    moe_layers=_qwen_moe_layers(d),
    intermediate_size=d["intermediate_size"],
    moe_intermediate_size=d["moe_intermediate_size"],
    num_experts=d["num_experts"],
    num_experts_per_tok=d["num_experts_per_tok"],
    norm_topk_prob=bool(d.get("norm_topk_prob", True)),
  )


def _from_mixtral(d):
  return MoEConfig(
    **_common(d, "mixtral"),
    moe_layers=(True,) * d["num_hidden_layers"],
    moe_intermediate_size=d["intermediate_size"],
    num_experts=d["num_local_experts"],
    num_experts_per_tok=d["num_experts_per_tok"],
    norm_topk_prob=True,
  )


def _from_olmoe(d):
  return MoEConfig(
    **_common(d, "olmoe"),
    attention_bias=bool(d.get("attention_bias", False)),
    qk_norm="full",
    clip_qkv=d.get("clip_qkv"),
    moe_layers=(True,) * d["num_hidden_layers"],
    moe_intermediate_size=d["intermediate_size"],
    num_experts=d["num_experts"],
    num_experts_per_tok=d["num_experts_per_tok"],
    norm_topk_prob=bool(d.get("norm_topk_prob", False)),
  )


def _mla_fields(d) -> dict[str, Any]:
  """Multi-head latent attention fields of DeepSeek-V2/V3.

  The saved configs also carry `head_dim = qk_rope_head_dim`; the query/key
  head size is `qk_nope_head_dim + qk_rope_head_dim` instead.
  """
  nope, rope = d["qk_nope_head_dim"], d["qk_rope_head_dim"]
  return dict(
    head_dim=nope + rope,
    num_kv_heads=d["num_attention_heads"],
    attention_type="mla",
    attention_bias=bool(d.get("attention_bias", False)),
    q_lora_rank=d.get("q_lora_rank"),
    kv_lora_rank=d["kv_lora_rank"],
    qk_nope_head_dim=nope,
    qk_rope_head_dim=rope,
    v_head_dim=d["v_head_dim"],
  )


def _deepseek_v2_v3_ffn(d) -> dict[str, Any]:
  """Feed-forward layout shared by DeepSeek-V2 and V3: one shared MLP of n_shared * expert width."""
  return dict(
    moe_layers=_deepseek_moe_layers(d, honour_freq=False),
    intermediate_size=d["intermediate_size"],
    moe_intermediate_size=d["moe_intermediate_size"],
    num_experts=d["n_routed_experts"],
    num_experts_per_tok=d["num_experts_per_tok"],
    shared_intermediate_size=d["moe_intermediate_size"] * (d.get("n_shared_experts") or 0),
    routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
    router_fp32=True,
  )


def _from_deepseek_v2(d):
  """DeepSeek-V2: softmax router, greedy or group_limited_greedy, interleaved rope.

  transformers never renormalises the top-k weights of V2 (`norm_topk_prob`
  is ignored; every released V2 config has it False); they are only scaled.
  """
  topk_method = d.get("topk_method") or "greedy"
  if topk_method not in ("greedy", "group_limited_greedy"):
    raise UnsupportedModelError(f"DeepSeek-V2 topk_method {topk_method!r}; supported: greedy, group_limited_greedy.")
  grouped = topk_method == "group_limited_greedy"
  return MoEConfig(
    **_common(d, "deepseek_v2", **_mla_fields(d)),
    rope_interleave=True,
    **_deepseek_v2_v3_ffn(d),
    scoring_func="softmax",
    topk_method=topk_method,
    n_group=d["n_group"] if grouped else 1,
    topk_group=d["topk_group"] if grouped else 1,
  )


def _from_deepseek_v3(d):
  """DeepSeek-V3: sigmoid scores, noaux_tc grouped selection with e_score_correction_bias.

  transformers ignores `topk_method` and `scoring_func` for V3; `n_group` /
  `topk_group` of None mean a single group.
  """
  return MoEConfig(
    **_common(d, "deepseek_v3", **_mla_fields(d)),
    rope_interleave=bool(d.get("rope_interleave", True)),
    **_deepseek_v2_v3_ffn(d),
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    n_group=d.get("n_group") or 1,
    topk_group=d.get("topk_group") or 1,
    norm_topk_prob=bool(d.get("norm_topk_prob", True)),
    router_bias=True,
  )


# Defaults of the remote-code config classes (transformers does not ship these families).
_DEEPSEEK_DEFAULTS = dict(
  hidden_act="silu",
  max_position_embeddings=2048,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  tie_word_embeddings=False,
  attention_bias=False,
  n_shared_experts=None,
  n_routed_experts=None,
  num_experts_per_tok=None,
  first_k_dense_replace=0,
  moe_layer_freq=1,
  norm_topk_prob=False,
  scoring_func="softmax",
  intermediate_size=11008,
  moe_intermediate_size=1407,
)
_XVERSE_DEFAULTS = dict(
  hidden_act="silu",
  max_position_embeddings=8192,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  tie_word_embeddings=False,
  num_experts=None,
  num_shared_experts=None,
  norm_topk_prob=False,
)


def _from_deepseek(d):
  """DeepSeek-MoE v1 (deepseek-moe-16b): Llama attention, softmax top-k, no routed scaling.

  The remote code renormalises the top-k weights only if `k > 1`.
  """
  d = {**_DEEPSEEK_DEFAULTS, **d}
  if d["scoring_func"] != "softmax":
    raise UnsupportedModelError(f"DeepSeek-MoE scoring_func {d['scoring_func']!r}; only 'softmax' exists.")
  k = d["num_experts_per_tok"] or 0
  return MoEConfig(
    **_common(d, "deepseek", head_dim=d["hidden_size"] // d["num_attention_heads"]),
    attention_bias=bool(d["attention_bias"]),
    moe_layers=_deepseek_moe_layers(d, honour_freq=True),
    intermediate_size=d["intermediate_size"],
    moe_intermediate_size=d["moe_intermediate_size"],
    num_experts=d["n_routed_experts"] or 0,
    num_experts_per_tok=k,
    shared_intermediate_size=d["moe_intermediate_size"] * (d["n_shared_experts"] or 0),
    norm_topk_prob=bool(d["norm_topk_prob"]) and k > 1,
  )


def _from_xverse(d):
  """XVERSE-MoE: Llama attention without biases, every layer MoE; `intermediate_size` is per expert.

  Without `num_experts` it is the dense XVERSE layout (every layer an MLP of
  `intermediate_size`).
  """
  d = {**_XVERSE_DEFAULTS, **d}
  moe = d["num_experts"] is not None
  width = d["intermediate_size"]
  return MoEConfig(
    **_common(d, "xverse", head_dim=d["hidden_size"] // d["num_attention_heads"]),
    moe_layers=(moe,) * d["num_hidden_layers"],
    intermediate_size=width,
    moe_intermediate_size=width if moe else 0,
    num_experts=d["num_experts"] or 0,
    num_experts_per_tok=d["moe_top_k"] if moe else 0,
    shared_intermediate_size=width * (d["num_shared_experts"] or 0) if moe else 0,
    norm_topk_prob=bool(d["norm_topk_prob"]),
  )


_CONVERTERS = {
  "qwen2_moe": _from_qwen2_moe,
  "qwen3_moe": _from_qwen3_moe,
  "mixtral": _from_mixtral,
  "olmoe": _from_olmoe,
  "deepseek_v2": _from_deepseek_v2,
  "deepseek_v3": _from_deepseek_v3,
  "deepseek": _from_deepseek,
  "xverse": _from_xverse,
}


SUPPORTED_MODEL_TYPES = _CONVERTERS.keys()
"""The model_types `from_hf_config` converts (a live view: `register_family` adds to it)."""


def register_family(model_type: str, converter) -> None:
  """Registers a `config.json dict -> MoEConfig` converter for a model_type."""
  _CONVERTERS[model_type] = converter


class _Fields(Mapping):
  """config.json fields, resolved through the transformers config class when one exists.

  The transformers class fills defaults and resolves aliases (e.g. Qwen3-MoE
  writes `num_local_experts` where hub configs say `num_experts`) and the
  rope convention; families that transformers does not ship read the raw dict.
  """

  def __init__(self, d: Mapping[str, Any]):
    self._d = dict(d)
    self._hf = None
    try:
      import transformers  # configs only; moejax never imports torch

      rest = {k: v for k, v in d.items() if k != "model_type"}
      self._hf = transformers.AutoConfig.for_model(d["model_type"], **rest)
    except (ImportError, ValueError, KeyError):
      self._hf = None

  def __getitem__(self, key):
    if self._hf is not None and hasattr(self._hf, key):
      return getattr(self._hf, key)
    return self._d[key]

  def __contains__(self, key):
    return (self._hf is not None and hasattr(self._hf, key)) or key in self._d

  def __iter__(self):
    return iter(self._d)

  def __len__(self):
    return len(self._d)

  def get(self, key, default=None):
    try:
      return self[key]
    except KeyError:
      return default


def from_hf_config(d: Mapping[str, Any]) -> MoEConfig:
  """Builds a `MoEConfig` from a HuggingFace `config.json` dictionary.

  Raises:
    UnsupportedModelError: the `model_type` is not one moejax implements.
  """
  model_type = d.get("model_type")
  if model_type not in _CONVERTERS:
    raise UnsupportedModelError(
      f"Unsupported model_type {model_type!r}. moejax supports: {', '.join(sorted(_CONVERTERS))}."
    )
  try:
    return _CONVERTERS[model_type](_Fields(d))
  except KeyError as e:
    raise ValueError(f"config.json of a {model_type} model lacks the field {e.args[0]!r}.") from e
