"""PyTorch reference models for the two MoE families that `transformers` does not ship.

* ``model_type == "deepseek"``  -- DeepSeek-MoE-16B (deepseek-ai/deepseek-moe-16b-base, remote code
  ``modeling_deepseek.py`` / ``configuration_deepseek.py``).
* ``model_type == "xverse"``    -- XVERSE-MoE-A4.2B (xverse/XVERSE-MoE-A4.2B, remote code
  ``modeling_xverse.py``); semantics taken from the vendor-contributed SGLang port
  ``python/sglang/srt/models/xverse_moe.py`` (sgl-project/sglang PR #1397, "follows the structure of
  the Deepseek-v1 model").

Both are assembled from ``transformers`` Llama building blocks (``LlamaAttention``,
``LlamaRotaryEmbedding``, ``LlamaRMSNorm``) plus a small MoE block written with plain torch ops.
The module tree is laid out so that ``model.state_dict()`` already uses the exact hub key names,
so ``save_hub_checkpoint`` writes a checkpoint that a loader for the real models must read.
See ``notes/model_families.md`` for which real-model behaviour each choice reproduces.

Public API  (import as ``from tests.models.reference_models import ...``)
----------
tiny_deepseek_config(**overrides) -> dict          config.json-style dict (real field names)
tiny_xverse_config(**overrides) -> dict
build_deepseek_reference(cfg_dict, seed=0) -> ReferenceCausalLM
build_xverse_reference(cfg_dict, seed=0) -> ReferenceCausalLM
build_reference(cfg_dict, seed=0)                  dispatch on cfg_dict["model_type"]
save_hub_checkpoint(model, cfg_dict, path, dtype=torch.float32, num_shards=1)
load_hub_checkpoint(path) -> ReferenceCausalLM      (round-trip helper, reads config.json + safetensors)
greedy_generate(model, input_ids, max_new_tokens) -> LongTensor [B, T + max_new_tokens]
moe_layer_indices(cfg_dict) -> list[int]           which decoder layers are MoE for that config

``ReferenceCausalLM.forward(input_ids) -> logits`` ([B, T, V], float32, causal, positions 0..T-1,
no padding mask, no KV cache).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding

__all__ = [
  "ReferenceCausalLM",
  "build_deepseek_reference",
  "build_reference",
  "build_xverse_reference",
  "greedy_generate",
  "load_hub_checkpoint",
  "moe_layer_indices",
  "save_hub_checkpoint",
  "tiny_deepseek_config",
  "tiny_xverse_config",
]


# --------------------------------------------------------------------------------------------
# Tiny configs (real config.json field names, tiny sizes)
# --------------------------------------------------------------------------------------------


def tiny_deepseek_config(**overrides: Any) -> dict:
  """Tiny DeepSeek-MoE (v1) config.json dict.

  Field names/values mirror deepseek-ai/deepseek-moe-16b-base/config.json (real values in comments).
  Defaults exercise: shared experts (n_shared_experts=2), a leading dense layer
  (first_k_dense_replace=1), softmax gating, norm_topk_prob=False.  Useful variants:
  ``tiny_deepseek_config(norm_topk_prob=True)``, ``tiny_deepseek_config(moe_layer_freq=2,
  num_hidden_layers=5)`` (MoE layers 2 and 4 only), ``tiny_deepseek_config(n_shared_experts=None)``.
  """
  cfg = {
    "architectures": ["DeepseekForCausalLM"],
    "auto_map": {
      "AutoConfig": "configuration_deepseek.DeepseekConfig",
      "AutoModel": "modeling_deepseek.DeepseekModel",
      "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "model_type": "deepseek",
    "vocab_size": 128,  # real 102400
    "hidden_size": 64,  # real 2048
    "intermediate_size": 96,  # real 10944 (dense layers only)
    "moe_intermediate_size": 24,  # real 1408 (per routed expert)
    "num_hidden_layers": 4,  # real 28
    "num_attention_heads": 4,  # real 16 -> head_dim 128
    "num_key_value_heads": 4,  # real 16 (MHA)
    "n_routed_experts": 8,  # real 64
    "n_shared_experts": 2,  # real 2 (fused into ONE MLP of width 2*moe_intermediate_size)
    "num_experts_per_tok": 3,  # real 6
    "first_k_dense_replace": 1,  # real 1
    "moe_layer_freq": 1,  # real 1
    "norm_topk_prob": False,  # real False
    "scoring_func": "softmax",  # real "softmax" (only value supported by the remote code)
    "aux_loss_alpha": 0.001,  # training only
    "seq_aux": True,  # training only
    "hidden_act": "silu",
    "max_position_embeddings": 4096,  # real 4096
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,  # real 1e-06
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 100000 % 128,  # real 100000
    "eos_token_id": 100001 % 128,  # real 100001
    "pretraining_tp": 1,
    "tie_word_embeddings": False,  # real False
    "rope_theta": 10000,  # real 10000
    "rope_scaling": None,  # real null; remote code supports {"type": "linear"|"dynamic", "factor": f}
    "attention_bias": False,  # real False
    "attention_dropout": 0.0,
    "torch_dtype": "float32",  # real "bfloat16"
    "transformers_version": "4.36.0",
  }
  cfg.update(overrides)
  return cfg


def tiny_xverse_config(**overrides: Any) -> dict:
  """Tiny XVERSE-MoE config.json dict.

  Field names follow XVERSE-MoE-A4.2B (model table: 28 layers, d_model 2560, 32 heads,
  d_ff 1728 per expert, 64 routed experts, 2 shared, top-6; field names as read by the vendor's
  SGLang port: ``num_experts``, ``moe_top_k``, ``num_shared_experts``, ``intermediate_size`` is the
  PER-EXPERT width).  Every layer is MoE when ``num_experts`` is set.  ``norm_topk_prob`` is not a
  field of the real config (read with ``getattr(..., False)``); set it to exercise renormalisation:
  ``tiny_xverse_config(norm_topk_prob=True)``.  ``tiny_xverse_config(num_shared_experts=None)``
  drops the shared MLP; ``tiny_xverse_config(num_experts=None)`` gives the dense XVERSE layout.
  """
  cfg = {
    "architectures": ["XverseForCausalLM"],
    "auto_map": {
      "AutoConfig": "configuration_xverse.XverseConfig",
      "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM",
    },
    "model_type": "xverse",
    "vocab_size": 160,  # real ~100.5k (XVERSE tokenizer; 25.78B total params implies ~100.3-100.5k, untied)
    "hidden_size": 64,  # real 2560
    "intermediate_size": 32,  # real 1728 = per-expert FFN width (1/4 of a standard FFN)
    "num_hidden_layers": 3,  # real 28
    "num_attention_heads": 4,  # real 32 -> head_dim 80
    "num_key_value_heads": 4,  # absent in the real config -> defaults to num_attention_heads (MHA)
    "num_experts": 8,  # real 64
    "moe_top_k": 3,  # real 6
    "num_shared_experts": 2,  # real 2 (fused into ONE MLP of width 2*intermediate_size)
    "hidden_act": "silu",
    "max_position_embeddings": 8192,  # model card: trained on 8K samples (value not verified)
    "max_tokenizer_truncation": 6144,  # chat-demo only, no effect on the forward pass
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "tie_word_embeddings": False,
    "rope_theta": 10000,  # read with getattr(config, "rope_theta", 10000)
    "router_aux_loss_coef": 0.01,  # training only
    "output_router_logits": False,
    "torch_dtype": "float32",
    "transformers_version": "4.38.2",
  }
  cfg.update(overrides)
  return cfg


# --------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------


def _rope_parameters(cfg: dict) -> dict:
  """Map the legacy rope_theta/rope_scaling fields to a transformers rope_parameters dict."""
  theta = float(cfg.get("rope_theta", 10000.0) or 10000.0)
  scaling = cfg.get("rope_scaling")
  if not scaling:
    return {"rope_type": "default", "rope_theta": theta}
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type not in ("linear", "dynamic"):
    # DeepSeek-MoE's remote code only implements linear and dynamic NTK and raises otherwise.
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
  return {"rope_type": rope_type, "rope_theta": theta, "factor": float(scaling["factor"])}


def _llama_attention_config(cfg: dict, *, attention_bias: bool) -> LlamaConfig:
  heads = cfg["num_attention_heads"]
  kv_heads = cfg.get("num_key_value_heads") or heads
  return LlamaConfig(
    vocab_size=cfg["vocab_size"],
    hidden_size=cfg["hidden_size"],
    intermediate_size=cfg.get("intermediate_size", 4 * cfg["hidden_size"]),
    num_hidden_layers=cfg["num_hidden_layers"],
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    head_dim=cfg["hidden_size"] // heads,
    max_position_embeddings=cfg.get("max_position_embeddings", 4096),
    rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
    rope_parameters=_rope_parameters(cfg),
    attention_bias=attention_bias,
    attention_dropout=0.0,
    attn_implementation="eager",
  )


def moe_layer_indices(cfg: dict) -> list[int]:
  """Indices of the decoder layers that carry an MoE block (the rest are dense SwiGLU MLPs)."""
  n = cfg["num_hidden_layers"]
  if cfg["model_type"] == "deepseek":
    # modeling_deepseek.DeepseekDecoderLayer: n_routed_experts is not None and
    # layer_idx >= first_k_dense_replace and layer_idx % moe_layer_freq == 0
    if cfg.get("n_routed_experts") is None:
      return []
    k = cfg.get("first_k_dense_replace", 0)
    freq = cfg.get("moe_layer_freq", 1)
    return [i for i in range(n) if i >= k and i % freq == 0]
  if cfg["model_type"] == "xverse":
    # xverse_moe.XverseDecoderLayer: MoE in every layer iff config.num_experts is not None
    return list(range(n)) if cfg.get("num_experts") is not None else []
  raise ValueError(f"unknown model_type {cfg['model_type']!r}")


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class GatedMLP(nn.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x)), no biases (DeepseekMLP / XverseMLP)."""

  def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu"):
    super().__init__()
    self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
    self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
    self.act_fn = ACT2FN[hidden_act]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SoftmaxTopKMoE(nn.Module):
  """Softmax top-k routed experts + always-on fused shared MLP (DeepSeek-MoE v1 / XVERSE-MoE).

  routing:  p = softmax(x @ W_router^T) (float32) ; (w, idx) = topk(p, k)
            if norm_topk_prob and k > 1: w = w / (sum(w) + 1e-20)     # (no routed_scaling_factor)
  output:   sum_j w_j * expert_{idx_j}(x)  +  shared_experts(x)
  ``router_name`` is "gate" for DeepSeek (key ``mlp.gate.weight``) and "router" for XVERSE
  (key ``mlp.router.weight``).
  """

  def __init__(
    self,
    hidden_size: int,
    expert_intermediate_size: int,
    num_experts: int,
    top_k: int,
    num_shared_experts: int | None,
    norm_topk_prob: bool,
    hidden_act: str,
    router_name: str,
  ):
    super().__init__()
    self.num_experts = num_experts
    self.top_k = top_k
    self.norm_topk_prob = bool(norm_topk_prob)
    self.router_name = router_name
    self.experts = nn.ModuleList(
      [GatedMLP(hidden_size, expert_intermediate_size, hidden_act) for _ in range(num_experts)]
    )
    # Router: a bare weight [num_experts, hidden] (DeepSeek MoEGate.weight / XVERSE nn.Linear no bias).
    setattr(self, router_name, nn.Linear(hidden_size, num_experts, bias=False))
    self.shared_experts = (
      GatedMLP(hidden_size, expert_intermediate_size * num_shared_experts, hidden_act) if num_shared_experts else None
    )

  def route(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (router_logits [N,E], topk_weights [N,k], topk_idx [N,k])."""
    logits = F.linear(x2d, getattr(self, self.router_name).weight)
    scores = torch.softmax(logits.float(), dim=-1)
    topk_w, topk_idx = torch.topk(scores, k=self.top_k, dim=-1)
    if self.norm_topk_prob and self.top_k > 1:
      topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, topk_w.to(x2d.dtype), topk_idx

  def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    _, topk_w, topk_idx = self.route(x)
    dense_w = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
    dense_w.scatter_(1, topk_idx, topk_w)  # [N, E], zeros for unselected experts
    out = torch.zeros_like(x)
    for e in torch.nonzero(dense_w.abs().sum(0) > 0).flatten().tolist():
      rows = torch.nonzero(dense_w[:, e] != 0).flatten()
      out.index_add_(0, rows, self.experts[e](x[rows]) * dense_w[rows, e : e + 1])
    if self.shared_experts is not None:
      out = out + self.shared_experts(x)
    return out.reshape(shape)


class DecoderLayer(nn.Module):
  def __init__(self, attn_config: LlamaConfig, layer_idx: int, mlp: nn.Module, eps: float):
    super().__init__()
    self.self_attn = LlamaAttention(attn_config, layer_idx)
    self.mlp = mlp
    self.input_layernorm = LlamaRMSNorm(attn_config.hidden_size, eps=eps)
    self.post_attention_layernorm = LlamaRMSNorm(attn_config.hidden_size, eps=eps)

  def forward(self, h: torch.Tensor, position_embeddings, attention_mask: torch.Tensor) -> torch.Tensor:
    attn_out, _ = self.self_attn(
      self.input_layernorm(h), position_embeddings=position_embeddings, attention_mask=attention_mask
    )
    h = h + attn_out
    return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
  def __init__(self, attn_config: LlamaConfig, layers: list[DecoderLayer], eps: float, pad_token_id):
    super().__init__()
    pad = pad_token_id if pad_token_id is not None and 0 <= pad_token_id < attn_config.vocab_size else None
    self.embed_tokens = nn.Embedding(attn_config.vocab_size, attn_config.hidden_size, padding_idx=pad)
    self.layers = nn.ModuleList(layers)
    self.norm = LlamaRMSNorm(attn_config.hidden_size, eps=eps)
    self.rotary_emb = LlamaRotaryEmbedding(attn_config)  # inv_freq is a non-persistent buffer

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    h = self.embed_tokens(input_ids)
    bsz, t = input_ids.shape
    position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(bsz, t)
    position_embeddings = self.rotary_emb(h, position_ids)
    mask = torch.full((t, t), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)
    mask = mask[None, None].expand(bsz, 1, t, t)
    for layer in self.layers:
      h = layer(h, position_embeddings, mask)
    return self.norm(h)


class ReferenceCausalLM(nn.Module):
  """``forward(input_ids) -> logits [B, T, V]``; state_dict keys are the hub checkpoint keys."""

  def __init__(self, cfg: dict, model: DecoderModel):
    super().__init__()
    self.cfg = copy.deepcopy(cfg)
    self.model = model
    self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
    if cfg.get("tie_word_embeddings", False):
      self.lm_head.weight = self.model.embed_tokens.weight

  @property
  def model_type(self) -> str:
    return self.cfg["model_type"]

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    return self.lm_head(self.model(input_ids)).float()

  @torch.no_grad()
  def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    return greedy_generate(self, input_ids, max_new_tokens)

  def hub_state_dict(self) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in self.state_dict().items() if "rotary_emb" not in k}
    if self.cfg.get("tie_word_embeddings", False):
      sd.pop("lm_head.weight", None)  # HF convention: tied head is not saved
    return sd


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _init_weights(model: ReferenceCausalLM, seed: int, router_std: float) -> None:
  """Deterministic init: Linear/Embedding ~ N(0, initializer_range), routers ~ N(0, router_std),
  RMSNorm weights ~ 1 + N(0, 0.1) (non-trivial so that norm-weight loading is actually tested).
  router_std is larger than initializer_range so that top-k routing margins are well above float
  noise (otherwise a JAX port can legitimately pick a different expert on near-ties)."""
  gen = torch.Generator().manual_seed(seed)
  std = float(model.cfg.get("initializer_range", 0.02))
  with torch.no_grad():
    for name, p in model.named_parameters():  # named_parameters dedups tied weights
      if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
        p.copy_(torch.randn(p.shape, generator=gen) * router_std)
      elif "norm" in name.split(".")[-2]:
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):
        p.copy_(0.02 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def _build_llama_moe_reference(
  cfg: dict,
  seed: int,
  router_std: float,
  *,
  attention_bias: bool,
  expert_width: str,
  num_experts: str,
  top_k: str,
  shared: str,
  router_name: str,
) -> ReferenceCausalLM:
  """Llama attention + softmax top-k MoE layers; the keyword arguments name each family's config fields."""
  attn_cfg = _llama_attention_config(cfg, attention_bias=attention_bias)
  eps = cfg.get("rms_norm_eps", 1e-6)
  moe_layers = set(moe_layer_indices(cfg))
  layers = []
  for i in range(cfg["num_hidden_layers"]):
    if i in moe_layers:
      mlp = SoftmaxTopKMoE(
        hidden_size=cfg["hidden_size"],
        expert_intermediate_size=cfg[expert_width],
        num_experts=cfg[num_experts],
        top_k=cfg[top_k],
        num_shared_experts=cfg.get(shared),
        norm_topk_prob=cfg.get("norm_topk_prob", False),
        hidden_act=cfg.get("hidden_act", "silu"),
        router_name=router_name,
      )
    else:
      mlp = GatedMLP(cfg["hidden_size"], cfg["intermediate_size"], cfg.get("hidden_act", "silu"))
    layers.append(DecoderLayer(attn_cfg, i, mlp, eps))
  model = ReferenceCausalLM(cfg, DecoderModel(attn_cfg, layers, eps, cfg.get("pad_token_id")))
  _init_weights(model, seed, router_std)
  return model.eval()


def build_deepseek_reference(cfg_dict: dict, seed: int = 0, router_std: float = 0.5) -> ReferenceCausalLM:
  """DeepSeek-MoE (v1, model_type "deepseek") reference, float32, eval mode."""
  cfg = copy.deepcopy(cfg_dict)
  if cfg.get("model_type") != "deepseek":
    raise ValueError("build_deepseek_reference needs model_type 'deepseek'")
  if cfg.get("scoring_func", "softmax") != "softmax":
    raise ValueError("DeepSeek-MoE remote code only supports scoring_func='softmax'")
  return _build_llama_moe_reference(
    cfg,
    seed,
    router_std,
    attention_bias=bool(cfg.get("attention_bias", False)),
    expert_width="moe_intermediate_size",
    num_experts="n_routed_experts",
    top_k="num_experts_per_tok",
    shared="n_shared_experts",
    router_name="gate",
  )


def build_xverse_reference(cfg_dict: dict, seed: int = 0, router_std: float = 0.5) -> ReferenceCausalLM:
  """XVERSE-MoE (model_type "xverse") reference, float32, eval mode."""
  cfg = copy.deepcopy(cfg_dict)
  if cfg.get("model_type") != "xverse":
    raise ValueError("build_xverse_reference needs model_type 'xverse'")
  # XVERSE attention has no bias option (q/k/v/o bias=False in every XVERSE implementation).
  return _build_llama_moe_reference(
    cfg,
    seed,
    router_std,
    attention_bias=False,
    expert_width="intermediate_size",
    num_experts="num_experts",
    top_k="moe_top_k",
    shared="num_shared_experts",
    router_name="router",
  )


def build_reference(cfg_dict: dict, seed: int = 0, **kw: Any) -> ReferenceCausalLM:
  builders = {"deepseek": build_deepseek_reference, "xverse": build_xverse_reference}
  return builders[cfg_dict["model_type"]](cfg_dict, seed, **kw)


# --------------------------------------------------------------------------------------------
# Generation, save, load
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
  """Greedy decoding by repeated full forwards (no cache); returns prompt + new tokens."""
  ids = input_ids.clone()
  for _ in range(max_new_tokens):
    nxt = model(ids)[:, -1, :].argmax(dim=-1, keepdim=True)
    ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
  return ids


def save_hub_checkpoint(
  model: ReferenceCausalLM,
  cfg_dict: dict | None,
  path: str | os.PathLike,
  dtype: torch.dtype = torch.float32,
  num_shards: int = 1,
) -> list[str]:
  """Write ``config.json`` + safetensors with the exact hub key names.

  num_shards == 1 -> ``model.safetensors``; > 1 -> ``model-0000i-of-0000N.safetensors`` plus
  ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {...}}``),
  like the real (sharded) hub repos.  ``dtype`` lets you write bf16 like the real checkpoints.
  Returns the sorted list of written tensor keys.
  """
  cfg = copy.deepcopy(cfg_dict if cfg_dict is not None else model.cfg)
  cfg["torch_dtype"] = str(dtype).replace("torch.", "")
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  sd = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.hub_state_dict().items()}
  keys = sorted(sd)
  meta = {"format": "pt"}
  if num_shards <= 1:
    save_file(sd, os.path.join(path, "model.safetensors"), metadata=meta)
    return keys
  per = math.ceil(len(keys) / num_shards)
  weight_map: dict[str, str] = {}
  for s in range(num_shards):
    fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
    chunk = {k: sd[k] for k in keys[s * per : (s + 1) * per]}
    save_file(chunk, os.path.join(path, fname), metadata=meta)
    weight_map.update({k: fname for k in chunk})
  total = sum(t.numel() * t.element_size() for t in sd.values())
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
  return keys


def load_hub_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> ReferenceCausalLM:
  """Rebuild a reference model from a directory written by save_hub_checkpoint (strict load)."""
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  model = build_reference(cfg, seed=0)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  sd: dict[str, torch.Tensor] = {}
  for fname in files:
    sd.update(load_file(os.path.join(path, fname)))
  sd = {k: v.to(dtype) for k, v in sd.items()}
  expected = set(model.hub_state_dict())
  missing, unexpected = expected - set(sd), set(sd) - expected
  if missing or unexpected:
    raise KeyError(f"checkpoint mismatch: missing={sorted(missing)} unexpected={sorted(unexpected)}")
  model.load_state_dict(sd, strict=False)  # strict=False only for a tied lm_head / rotary buffers
  return model.to(dtype).eval()
