"""Model configuration: one frozen dataclass for every supported MoE architecture.

The three Hugging Face families (OLMoE, Qwen2-MoE / Qwen1.5-MoE, Qwen3-MoE) differ only in a handful of
switches (QK-norm flavour, biases, shared expert, top-k renormalisation, dense layers), so one config and one
code path serve all of them. The config is hashable: Flax modules hold it as a static attribute.

Parameter tree produced by `phds_jax.models.build(cfg)` (kernels are `[in, out]`):

    embed/embedding                     [V, D]
    layer_{i}/input_norm/scale          [D]
    layer_{i}/attn/{q,k,v}_proj/kernel  [D, H*hd] / [D, KV*hd]   (+ bias when `qkv_bias`)
    layer_{i}/attn/o_proj/kernel        [H*hd, D]                (+ bias when `o_bias`)
    layer_{i}/attn/{q,k}_norm/scale     [H*hd] / [KV*hd] ('full') or [hd] ('per_head')
    layer_{i}/post_attn_norm/scale      [D]
    layer_{i}/moe/router/kernel         [D, E]
    layer_{i}/moe/wi                    [E, D, 2F]   gate columns first, then up
    layer_{i}/moe/wo                    [E, F, D]
    layer_{i}/moe/shared/{wi,wo}        [D, 2S], [S, D]          (shared expert, Qwen2-MoE)
    layer_{i}/moe/shared_gate/kernel    [D, 1]
    layer_{i}/mlp/{wi,wo}               [D, 2F_dense], [F_dense, D]  (dense layers instead of `moe`)
    final_norm/scale                    [D]
    lm_head/kernel                      [D, V]       (absent when embeddings are tied)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from phds_jax.kernels.registry import GMM_IMPLS, ROUTING_IMPLS  # the impl names, defined once there

ModelType = Literal["olmoe", "qwen2_moe", "qwen3_moe"]
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("olmoe", "qwen2_moe", "qwen3_moe")
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn")  # see models.attention.attention_impl_for
LB_NORMS: tuple[str, ...] = ("k", "hf")  # balance loss divided by k (ours) or transformers' form, see router.route
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A model configuration that cannot be built."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of an MoE decoder-only language model."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  k_pre: int  # top-k the checkpoint was (pre)trained at: HF `num_experts_per_tok`.
  moe_ffn: int  # routed expert intermediate size.
  dense_ffn: int = 0  # intermediate size of dense (non-MoE) layers, if any.
  shared_ffn: int = 0  # shared-expert intermediate size; 0 = no shared expert.
  moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False). () = all MoE.
  norm_topk_prob: bool = False
  qk_norm: Literal["none", "full", "per_head"] = "none"
  qkv_bias: bool = False
  o_bias: bool = False
  clip_qkv: float | None = None
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  # PHDS: weight given to slots ranked in (k, k_pre] by the soft router (paper §1.4).
  router_eps: float = 1e-6
  # Load-balance loss normalisation: 'k' (ours, divided by the current k) or 'hf' (transformers' form).
  router_lb_norm: str = "k"
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  gmm_impl: str = "auto"  # grouped-matmul implementation, see phds_jax.kernels.gmm
  # 'jax' | 'pallas': the routing kernels (fused top-k selection, token permutation, weighted combine).
  routing_impl: str = "jax"
  # 'xla': einsum attention with an explicit mask (the reference); 'cudnn': jax.nn.dot_product_attention's
  # fused cuDNN kernel on GPU (XLA's fused path elsewhere); 'auto': cudnn for bf16/fp16 on GPU, else xla.
  attention_impl: str = "auto"
  moe_impl: Literal["sparse", "dense"] = "sparse"  # 'dense' = masked reference (tests only)
  # Few-token MoE steps (decoding): 'gather' applies the chosen experts' weights directly when
  # tokens × slots <= num_experts (models.experts.routed_experts_gathered); 'grouped' always sorts + gmm.
  decode_moe: Literal["gather", "grouped"] = "gather"
  # Fields of the source config.json we do not model (token ids, architectures, ...), kept as JSON so that
  # `hf.save` writes them back; a string keeps the dataclass hashable.
  hf_extra_json: str = "{}"

  def __post_init__(self):
    if not self.moe_layers:
      object.__setattr__(self, "moe_layers", (True,) * self.num_layers)
    validate(self)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def validate(cfg: ModelConfig) -> None:
  """Raises ConfigError with a readable message for any inconsistent field."""

  def need(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(f"invalid ModelConfig ({cfg.model_type}): {msg}")

  need(cfg.model_type in SUPPORTED_MODEL_TYPES,
       f"model_type {cfg.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
  for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "num_experts", "k_pre", "moe_ffn"):
    need(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
  need(cfg.num_heads % cfg.num_kv_heads == 0,
       f"num_heads {cfg.num_heads} must be a multiple of num_kv_heads {cfg.num_kv_heads}")
  need(cfg.head_dim % 2 == 0, f"head_dim {cfg.head_dim} must be even for RoPE")
  need(1 <= cfg.k_pre <= cfg.num_experts, f"k_pre {cfg.k_pre} must be in [1, num_experts={cfg.num_experts}]")
  need(len(cfg.moe_layers) == cfg.num_layers,
       f"moe_layers has {len(cfg.moe_layers)} entries for {cfg.num_layers} layers")
  need(all(cfg.moe_layers) or cfg.dense_ffn > 0, "dense layers present but dense_ffn is 0")
  need(cfg.qk_norm in ("none", "full", "per_head"), f"qk_norm {cfg.qk_norm!r}")
  need(cfg.shared_ffn >= 0, "shared_ffn must be >= 0")
  need(0.0 <= cfg.router_eps < 1.0, f"router_eps {cfg.router_eps} must be in [0, 1)")
  need(cfg.router_lb_norm in LB_NORMS, f"router_lb_norm {cfg.router_lb_norm!r} is not one of {LB_NORMS}")
  need(cfg.dtype in _DTYPES and cfg.param_dtype in _DTYPES,
       f"dtype/param_dtype must be in {_DTYPES}, got {cfg.dtype}/{cfg.param_dtype}")
  need(cfg.gmm_impl in GMM_IMPLS, f"gmm_impl {cfg.gmm_impl!r} is not one of {GMM_IMPLS}")
  need(cfg.routing_impl in ROUTING_IMPLS, f"routing_impl {cfg.routing_impl!r} is not one of {ROUTING_IMPLS}")
  need(cfg.attention_impl in ATTENTION_IMPLS,
       f"attention_impl {cfg.attention_impl!r} is not one of {ATTENTION_IMPLS}")
  need(cfg.moe_impl in ("sparse", "dense"), f"moe_impl {cfg.moe_impl!r}")
  need(cfg.decode_moe in ("gather", "grouped"), f"decode_moe {cfg.decode_moe!r} is not 'gather' or 'grouped'")


def tiny(model_type: str = "olmoe", **overrides) -> ModelConfig:
  """A few-kilobyte model of the given family, for tests, the demo and benchmarks on CPU."""
  base = dict(model_type=model_type, vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, num_experts=8, k_pre=4, moe_ffn=32, rms_eps=1e-5)
  family = {
      "olmoe": dict(qk_norm="full"),
      "qwen2_moe": dict(qkv_bias=True, shared_ffn=48, rms_eps=1e-6),
      "qwen3_moe": dict(qk_norm="per_head", norm_topk_prob=True, rms_eps=1e-6),
  }
  if model_type not in family:
    raise ConfigError(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
  return ModelConfig(**{**base, **family[model_type], **overrides})
