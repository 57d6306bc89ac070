"""Causal self-attention with RoPE, GQA, optional QK-norm and a KV cache (Hugging Face conventions).

Two implementations of the attention core (`ModelConfig.attention_impl`, resolved by `attention_impl_for`):
"xla", the einsum code below with an explicit [B, T, L] mask (the reference, and the CPU default), and
"cudnn", `jax.nn.dot_product_attention` with implementation="cudnn" on GPU (cuDNN flash attention; the
mask rides along as a bias, `is_causal` lets it skip upper-triangle tiles) and XLA's own path elsewhere, so
the wiring is tested on CPU against the reference. "auto" takes cuDNN only where it pays and is known to
compile: a GPU, bf16/fp16, more than one query token, and a one-off compile on the device per signature
(a rejected kernel falls back to "xla" with a warning instead of failing inside the caller's jit).

Shape letters (x_BxTxD, q_BxTxHxK, k_BxLxGxK, mask_BxTxL) are listed once in transformer.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from phds_jax.kernels.platform import target_platform
from phds_jax.kernels.probes import compiles_on_device  # one compile per signature, cached
from phds_jax.models.config import ModelConfig
from phds_jax.models.layers import Linear, RMSNorm


class KVCache(NamedTuple):
  """Decoding state for all layers. Slots are absolute positions in the cache, not token positions.

  Prompts may be left-padded: `key_mask` records which slots hold real tokens, and `next_pos` the RoPE
  position of each row's next token, so padding never shifts positions or receives attention.
  """

  k: tuple[jax.Array, ...]  # per layer [B, L, G, K]
  v: tuple[jax.Array, ...]  # per layer [B, L, G, K]
  key_mask: jax.Array  # [B, L] bool, slot holds a real token
  next_pos: jax.Array  # [B] int32, RoPE position of the next real token
  # Next slot to write: a scalar int32 (every row writes the same columns, batch generation), or [B] int32
  # (each row its own column: continuous batching, where rows join and leave between steps).
  index: jax.Array


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `max_len` slots (prompt + generated tokens)."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))  # k, v: distinct buffers
  return KVCache(k=zeros(), v=zeros(), key_mask=jnp.zeros((batch_size, max_len), bool),
                 next_pos=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32))


def write_cache(cache_BxLxGxK: jax.Array, new_BxTxGxK: jax.Array, index: jax.Array) -> jax.Array:
  """Writes T new rows per sequence at cache slot `index` (scalar: same slot for all rows; [B]: per row)."""
  new_BxTxGxK = new_BxTxGxK.astype(cache_BxLxGxK.dtype)
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice(cache_BxLxGxK, new_BxTxGxK, (0, index, 0, 0))
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, 0, 0)))(cache_BxLxGxK, new_BxTxGxK, index)


def rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF 'rotate_half' layout (first half / second half of each head).
  H is any head count: query heads for q, key/value heads (G) for k."""
  head_dim = x_BxTxHxK.shape[-1]
  inv_freq_K2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # K2: K / 2
  freqs_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_K2
  angles_BxTx1xK = jnp.concatenate([freqs_BxTxK2, freqs_BxTxK2], axis=-1)[:, :, None, :]
  cos_BxTx1xK = jnp.cos(angles_BxTx1xK).astype(x_BxTxHxK.dtype)
  sin_BxTx1xK = jnp.sin(angles_BxTx1xK).astype(x_BxTxHxK.dtype)
  first_BxTxHxK2, second_BxTxHxK2 = jnp.split(x_BxTxHxK, 2, axis=-1)
  rotated_BxTxHxK = jnp.concatenate([-second_BxTxHxK2, first_BxTxHxK2], axis=-1)
  return x_BxTxHxK * cos_BxTx1xK + rotated_BxTxHxK * sin_BxTx1xK


def default_positions(attention_mask_BxT: jax.Array | None, segment_ids_BxT: jax.Array | None,
                      shape: tuple[int, int]) -> jax.Array:
  """Token positions: count of real tokens before each one (left padding safe), restarted per segment."""
  if segment_ids_BxT is not None:
    seg_BxT = segment_ids_BxT
    starts_BxT = jnp.concatenate([jnp.ones_like(seg_BxT[:, :1], bool), seg_BxT[:, 1:] != seg_BxT[:, :-1]], axis=1)
    index_BxT = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    seg_start_BxT = jax.lax.cummax(jnp.where(starts_BxT, index_BxT, 0), axis=1)
    return (index_BxT - seg_start_BxT).astype(jnp.int32)
  if attention_mask_BxT is not None:
    return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=1) - 1, 0)
  return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


def self_attention_mask(attention_mask_BxT: jax.Array | None, segment_ids_BxT: jax.Array | None,
                        shape: tuple[int, int]) -> jax.Array:
  """[B, T, L = T] bool: causal, keys must be real tokens, and queries only see their own packed segment."""
  b, t = shape
  mask_BxTxL = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  if attention_mask_BxT is not None:
    mask_BxTxL = mask_BxTxL & attention_mask_BxT.astype(bool)[:, None, :]
  if segment_ids_BxT is not None:
    mask_BxTxL = mask_BxTxL & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
  return mask_BxTxL


def dot_product_attention(q_BxTxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                          mask_BxTxL: jax.Array) -> jax.Array:
  """Grouped-query attention in fp32 softmax -> [B, T, H*K]; fully-masked rows (padding queries) give
  finite output."""
  b, t, h, hd = q_BxTxHxK.shape
  g = k_BxLxGxK.shape[2]
  q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, hd)
  logits_BxGxRxTxL = jnp.einsum("btgrk,blgk->bgrtl", q_BxTxGxRxK, k_BxLxGxK, preferred_element_type=jnp.float32)
  logits_BxGxRxTxL = logits_BxGxRxTxL * (hd ** -0.5)
  logits_BxGxRxTxL = jnp.where(mask_BxTxL[:, None, None], logits_BxGxRxTxL, jnp.finfo(jnp.float32).min)
  probs_BxGxRxTxL = jax.nn.softmax(logits_BxGxRxTxL, axis=-1).astype(v_BxLxGxK.dtype)
  out_BxTxGxRxK = jnp.einsum("bgrtl,blgk->btgrk", probs_BxGxRxTxL, v_BxLxGxK)
  return out_BxTxGxRxK.reshape(b, t, h * hd)


def fused_attention(q_BxTxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, mask_BxTxL: jax.Array, *,
                    causal: bool, implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention` (GQA native) -> [B, T, H*K]. `causal`: queries and keys are the same
  positions (no cache), so the mask is also lower-triangular and cuDNN may skip the tiles above it."""
  b, t, h, hd = q_BxTxHxK.shape
  out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_BxTxL[:, None],
                                             is_causal=causal and t == k_BxLxGxK.shape[1],
                                             implementation=implementation)
  return out_BxTxHxK.reshape(b, t, h * hd)


@dataclasses.dataclass(frozen=True)
class _CudnnProbe:
  """The cuDNN call for one signature (forward and backward), hashable for the per-signature compile cache."""

  causal: bool

  def __call__(self, q_BxTxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxTxL):
    def f(q_BxTxHxK, k_BxLxGxK, v_BxLxGxK):
      return fused_attention(q_BxTxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxTxL, causal=self.causal,
                             implementation="cudnn")
    out_BxTxHK, vjp = jax.vjp(f, q_BxTxHxK, k_BxLxGxK, v_BxLxGxK)
    return out_BxTxHK, vjp(out_BxTxHK)


_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
_WARNED: set[str] = set()


def attention_impl_for(impl: str, q_BxTxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                       mask_BxTxL: jax.Array, *, causal: bool) -> str:
  """'xla' | 'cudnn' for this call. An explicit choice is kept; 'auto' picks cuDNN on a GPU for bf16/fp16
  prefill/training shapes (T > 1) once it compiles there, and the reference einsum everywhere else."""
  if impl != "auto":
    return impl
  if target_platform() != "gpu" or jax.default_backend() != "gpu":  # no cuDNN to ask when lowering elsewhere
    return "xla"
  if q_BxTxHxK.dtype not in _FUSED_DTYPES or q_BxTxHxK.shape[1] == 1:
    return "xla"
  error = compiles_on_device(_CudnnProbe(causal), *[jax.ShapeDtypeStruct(a.shape, a.dtype)
                                                     for a in (q_BxTxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxTxL)])
  if error is None:
    return "cudnn"
  if error not in _WARNED:
    _WARNED.add(error)
    warnings.warn(f"cuDNN attention does not compile here; using the XLA einsum path: {error[:300]}", RuntimeWarning)
  return "xla"


def attend(q_BxTxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, mask_BxTxL: jax.Array, *,
           impl: str = "xla", causal: bool = False) -> jax.Array:
  """The attention core by implementation (see the module docstring) -> [B, T, H*K]."""
  impl = attention_impl_for(impl, q_BxTxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxTxL, causal=causal)
  if impl == "xla":
    return dot_product_attention(q_BxTxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxTxL)
  if impl != "cudnn":
    raise ValueError(f"unknown attention impl {impl!r}; valid: auto, xla, cudnn")
  implementation = "cudnn" if target_platform() == "gpu" else "xla"
  return fused_attention(q_BxTxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxTxL, causal=causal, implementation=implementation)


class Attention(nn.Module):
  """Multi-head attention block; `cache` is (cached keys, cached values, write index) when decoding (the mask
  over cache slots comes in `mask_BxTxL`)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_BxTxL: jax.Array,
               cache: tuple[jax.Array, jax.Array, jax.Array] | None = None):
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    h, g, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Projections stay flat ([B, T, H*K]) through OLMoE's norm over the whole projection and the clipping.
    q_BxTxHK = Linear(h * hd, cfg, use_bias=cfg.qkv_bias, name="q_proj")(x_BxTxD)
    k_BxTxGK = Linear(g * hd, cfg, use_bias=cfg.qkv_bias, name="k_proj")(x_BxTxD)
    v_BxTxGK = Linear(g * hd, cfg, use_bias=cfg.qkv_bias, name="v_proj")(x_BxTxD)
    if cfg.qk_norm == "full":  # OLMoE: one norm over the whole projection
      q_BxTxHK = RMSNorm(cfg, name="q_norm")(q_BxTxHK)
      k_BxTxGK = RMSNorm(cfg, name="k_norm")(k_BxTxGK)
    if cfg.clip_qkv is not None:
      q_BxTxHK, k_BxTxGK, v_BxTxGK = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv)
                                      for a in (q_BxTxHK, k_BxTxGK, v_BxTxGK))
    q_BxTxHxK = q_BxTxHK.reshape(b, t, h, hd)
    k_BxTxGxK, v_BxTxGxK = k_BxTxGK.reshape(b, t, g, hd), v_BxTxGK.reshape(b, t, g, hd)
    if cfg.qk_norm == "per_head":  # Qwen3: a norm per head
      q_BxTxHxK = RMSNorm(cfg, name="q_norm")(q_BxTxHxK)
      k_BxTxGxK = RMSNorm(cfg, name="k_norm")(k_BxTxGxK)
    q_BxTxHxK = rope(q_BxTxHxK, positions_BxT, cfg.rope_theta)
    k_BxTxGxK = rope(k_BxTxGxK, positions_BxT, cfg.rope_theta)
    new_cache = None
    if cache is None:
      k_BxLxGxK, v_BxLxGxK = k_BxTxGxK, v_BxTxGxK  # L = T: the keys are this call's tokens
    else:
      cache_k_BxLxGxK, cache_v_BxLxGxK, index = cache
      k_BxLxGxK = write_cache(cache_k_BxLxGxK, k_BxTxGxK, index)
      v_BxLxGxK = write_cache(cache_v_BxLxGxK, v_BxTxGxK, index)
      new_cache = (k_BxLxGxK, v_BxLxGxK)
    out_BxTxHK = attend(q_BxTxHxK, k_BxLxGxK.astype(q_BxTxHxK.dtype), v_BxLxGxK.astype(q_BxTxHxK.dtype),
                        mask_BxTxL, impl=cfg.attention_impl, causal=cache is None)
    out_BxTxD = Linear(cfg.hidden_size, cfg, use_bias=cfg.o_bias, name="o_proj")(out_BxTxHK)
    return out_BxTxD, new_cache
