"""Hugging Face config.json <-> ModelConfig for OLMoE, Qwen1.5-MoE (`qwen2_moe`) and Qwen3-MoE.

`config_from_hf` maps what our model implements and refuses what it does not (sliding windows, RoPE scaling,
other activations) rather than silently computing something else; keys it does not model are kept in
`hf_extra_json` so that `config_to_hf` writes them back. `config_to_hf` refuses configs HF cannot express.
"""

from __future__ import annotations

import json
from typing import Any

from phds_jax.models.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig

_ARCHITECTURES = {"olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}
_QK_NORM = {"olmoe": "full", "qwen2_moe": "none", "qwen3_moe": "per_head"}
# Keys `config_from_hf` turns into ModelConfig fields (or derives): everything else goes to `hf_extra_json`.
_CONSUMED = {
    "model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps",
    "tie_word_embeddings", "max_position_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
    "hidden_act", "layer_types",
}
_FAMILY_CONSUMED = {
    "olmoe": {"intermediate_size", "attention_bias", "clip_qkv"},
    "qwen2_moe": {"moe_intermediate_size", "shared_expert_intermediate_size", "qkv_bias", "mlp_only_layers",
                  "decoder_sparse_step"},
    "qwen3_moe": {"moe_intermediate_size", "attention_bias", "mlp_only_layers", "decoder_sparse_step"},
}


def _moe_pattern(num_layers: int, mlp_only: list[int], step: int) -> tuple[bool, ...]:
  """transformers' rule for which decoder layers hold a sparse MoE block (Qwen families)."""
  return tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))


def _check_supported(d: dict) -> None:
  """Rejects HF features our model does not implement, rather than silently computing something else."""
  mt = d["model_type"]
  if d.get("use_sliding_window"):
    raise ConfigError(f"{mt}: use_sliding_window=true is not supported (full causal attention only)")
  if any(t != "full_attention" for t in d.get("layer_types") or ()):
    raise ConfigError(f"{mt}: layer_types {d['layer_types']} not supported (full attention only)")
  if d.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"{mt}: hidden_act {d['hidden_act']!r} is not supported (silu only)")
  for name in ("rope_parameters", "rope_scaling"):
    rope = d.get(name)
    if rope is None:
      continue
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unknown = set(rope) - {"rope_type", "type", "rope_theta"}
    if rope_type != "default" or unknown:
      raise ConfigError(f"{mt}: {name}={rope} is not supported (only default RoPE, no scaling)")


def k_pre_of(d: dict) -> Any:
  """The pretraining top-k a checkpoint's JSON names (None if none): HF's `num_experts_per_tok`, or `k_pre` in
  an Orbax model_config.json. The one reader of k_pre from a config file (trainer, experiments, loading)."""
  return d.get("num_experts_per_tok", d.get("k_pre"))


def config_from_hf(d: dict, **overrides) -> ModelConfig:
  """A ModelConfig from a transformers config.json dict; fields we do not model go to `hf_extra_json`.

  `param_dtype` is float32 unless overridden (the checkpoint's dtype is ignored, see module docstring).
  """
  mt = d.get("model_type")
  if mt is None:
    raise ConfigError("config has no 'model_type'")
  if mt not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  _check_supported(d)

  def need(key: str) -> Any:
    if d.get(key) is None:
      raise ConfigError(f"{mt} config is missing {key!r}")
    return d[key]

  hidden, heads, layers = need("hidden_size"), need("num_attention_heads"), need("num_hidden_layers")
  head_dim = d.get("head_dim") or hidden // heads
  if mt == "olmoe" and head_dim * heads != hidden:
    raise ConfigError(f"olmoe needs head_dim * num_attention_heads == hidden_size, got {head_dim}*{heads}")
  num_experts = d.get("num_experts", d.get("num_local_experts"))
  if num_experts is None:
    raise ConfigError(f"{mt} config is missing 'num_experts' (or 'num_local_experts')")
  k_pre = k_pre_of(d)
  if k_pre is None:
    raise ConfigError(f"{mt} config is missing 'num_experts_per_tok'")
  rope = d.get("rope_parameters") or {}
  fields: dict[str, Any] = dict(
      model_type=mt, vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=layers,
      num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
      num_experts=num_experts, k_pre=k_pre,
      norm_topk_prob=bool(d.get("norm_topk_prob", False)), qk_norm=_QK_NORM[mt],
      rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
      rms_eps=float(d.get("rms_norm_eps", 1e-5 if mt == "olmoe" else 1e-6)),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      max_position_embeddings=int(d.get("max_position_embeddings", 4096)))
  consumed = _CONSUMED | _FAMILY_CONSUMED[mt]
  if mt == "olmoe":
    bias = bool(d.get("attention_bias", False))
    fields.update(moe_ffn=need("intermediate_size"), qkv_bias=bias, o_bias=bias, clip_qkv=d.get("clip_qkv"))
  else:
    step = int(d.get("decoder_sparse_step") or 1)
    if step < 1:
      raise ConfigError(f"{mt}: decoder_sparse_step must be >= 1, got {step}")
    moe_layers = _moe_pattern(layers, list(d.get("mlp_only_layers") or []), step)
    bias = bool(d.get("qkv_bias", True)) if mt == "qwen2_moe" else bool(d.get("attention_bias", False))
    fields.update(moe_ffn=need("moe_intermediate_size"), moe_layers=moe_layers, qkv_bias=bias,
                  o_bias=bias and mt == "qwen3_moe")
    if not all(moe_layers):
      fields["dense_ffn"] = need("intermediate_size")
      consumed = consumed | {"intermediate_size"}
    if mt == "qwen2_moe":
      fields["shared_ffn"] = need("shared_expert_intermediate_size")
  extra = {key: value for key, value in d.items() if key not in consumed}
  fields["hf_extra_json"] = json.dumps(extra, sort_keys=True)
  return ModelConfig(**{**fields, **overrides})


def _check_expressible(cfg: ModelConfig) -> None:
  """Our config can mix features freely; each HF family fixes some of them."""
  mt = cfg.model_type

  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(f"cannot express this config as HF {mt}: {msg}")

  need(mt in _ARCHITECTURES, f"unknown model_type {mt!r}")
  need(cfg.qk_norm == _QK_NORM[mt], f"{mt} needs qk_norm={_QK_NORM[mt]!r}, got {cfg.qk_norm!r}")
  need(mt == "olmoe" or cfg.clip_qkv is None, "clip_qkv is OLMoE-only")
  need((cfg.shared_ffn > 0) == (mt == "qwen2_moe"), f"shared_ffn={cfg.shared_ffn} (only qwen2_moe has one)")
  if mt == "qwen2_moe":
    need(not cfg.o_bias, "qwen2_moe has no o_proj bias")
  else:
    need(cfg.qkv_bias == cfg.o_bias, "attention_bias covers q, k, v and o alike")
  if mt == "olmoe":
    need(all(cfg.moe_layers), "olmoe has no dense layers")
    need(cfg.head_dim * cfg.num_heads == cfg.hidden_size, "olmoe needs head_dim * num_heads == hidden_size")


def _qwen_layout(moe_layers: tuple[bool, ...]) -> tuple[list[int], int]:
  """(mlp_only_layers, decoder_sparse_step) reproducing `moe_layers`, preferring the canonical forms."""
  n = len(moe_layers)
  for step in range(1, n + 1):
    if _moe_pattern(n, [], step) == moe_layers:
      return [], step
  return [i for i, is_moe in enumerate(moe_layers) if not is_moe], 1


def config_to_hf(cfg: ModelConfig, k: int | None = None) -> dict:
  """The transformers config.json dict for `cfg`; `k` (default `cfg.k_pre`) becomes num_experts_per_tok."""
  _check_expressible(cfg)
  k = cfg.k_pre if k is None else int(k)
  if not 1 <= k <= cfg.num_experts:
    raise ConfigError(f"k={k} must be in [1, num_experts={cfg.num_experts}]")
  mt = cfg.model_type
  d = json.loads(cfg.hf_extra_json)
  d.update(
      architectures=[_ARCHITECTURES[mt]], model_type=mt, dtype=cfg.param_dtype, vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, num_experts=cfg.num_experts, num_experts_per_tok=k,
      norm_topk_prob=cfg.norm_topk_prob, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_position_embeddings, hidden_act="silu", rope_theta=cfg.rope_theta,
      rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"})
  if mt == "qwen3_moe" or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    d["head_dim"] = cfg.head_dim
  if mt == "olmoe":
    d.update(intermediate_size=cfg.moe_ffn, attention_bias=cfg.qkv_bias, clip_qkv=cfg.clip_qkv)
    return d
  mlp_only, step = _qwen_layout(cfg.moe_layers)
  d.update(moe_intermediate_size=cfg.moe_ffn, mlp_only_layers=mlp_only, decoder_sparse_step=step)
  if cfg.dense_ffn:
    d["intermediate_size"] = cfg.dense_ffn
  if mt == "qwen2_moe":
    d.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.shared_ffn)
  else:
    d["attention_bias"] = cfg.qkv_bias
  return d
