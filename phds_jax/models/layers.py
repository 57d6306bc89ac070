"""Small building blocks shared by attention and the MoE block: Linear, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from phds_jax.models.config import ModelConfig

INIT_STD = 0.02  # HF `initializer_range` of every supported family.
kernel_init = nn.initializers.normal(INIT_STD)


def Linear(features: int, cfg: ModelConfig, *, use_bias: bool = False, name: str | None = None) -> nn.Dense:
  """A Dense layer with the model's param/compute dtypes ([in, out] kernel, HF init)."""
  return nn.Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                  kernel_init=kernel_init, name=name)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, statistics in fp32, as HF does (scale applied in the input dtype)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.rms_eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def swiglu(h_gate_up: jax.Array) -> jax.Array:
  """silu(gate) * up for a fused [..., 2F] projection laid out gate-first."""
  gate, up = jnp.split(h_gate_up, 2, axis=-1)
  return jax.nn.silu(gate) * up


class MLP(nn.Module):
  """Dense SwiGLU feed-forward (Qwen dense layers and the shared expert): wi [D, 2F], wo [F, D]."""

  cfg: ModelConfig
  ffn: int

  @nn.compact
  def __call__(self, x_TxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    d = x_TxD.shape[-1]
    wi = self.param("wi", kernel_init, (d, 2 * self.ffn), cfg.weight_dtype).astype(cfg.compute_dtype)
    wo = self.param("wo", kernel_init, (self.ffn, d), cfg.weight_dtype).astype(cfg.compute_dtype)
    return swiglu(x_TxD @ wi) @ wo
