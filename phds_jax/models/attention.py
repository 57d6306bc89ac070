"""Causal self-attention with RoPE, GQA, optional QK-norm and a KV cache (Hugging Face conventions).

Two implementations of the attention core (`ModelConfig.attention_impl`, resolved by `attention_impl_for`):
"xla", the einsum code below with an explicit [B, T, S] mask (the reference, and the CPU default), and
"cudnn", `jax.nn.dot_product_attention` with implementation="cudnn" on GPU (cuDNN flash attention; the
mask rides along as a bias, `is_causal` lets it skip upper-triangle tiles) and XLA's own path elsewhere, so
the wiring is tested on CPU against the reference. "auto" takes cuDNN only where it pays and is known to
compile: a GPU, bf16/fp16, more than one query token, and a one-off compile on the device per signature
(a rejected kernel falls back to "xla" with a warning instead of failing inside the caller's jit).
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

  k: tuple[jax.Array, ...]  # per layer [B, L, KV, hd]
  v: tuple[jax.Array, ...]  # per layer [B, L, KV, hd]
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


def write_cache(cache_BxLxKxD: jax.Array, new_BxTxKxD: jax.Array, index: jax.Array) -> jax.Array:
  """Writes T new rows per sequence at cache slot `index` (scalar: same slot for all rows; [B]: per row)."""
  new_BxTxKxD = new_BxTxKxD.astype(cache_BxLxKxD.dtype)
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice(cache_BxLxKxD, new_BxTxKxD, (0, index, 0, 0))
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (i, 0, 0)))(cache_BxLxKxD, new_BxTxKxD, index)


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF 'rotate_half' layout (first half / second half of each head)."""
  head_dim = x_BxTxNxH.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x_BxTxNxH.dtype), jnp.sin(emb).astype(x_BxTxNxH.dtype)
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxTxNxH * cos + rotated * sin


def default_positions(attention_mask_BxT: jax.Array | None, segment_ids_BxT: jax.Array | None,
                      shape: tuple[int, int]) -> jax.Array:
  """Token positions: count of real tokens before each one (left padding safe), restarted per segment."""
  if segment_ids_BxT is not None:
    seg = segment_ids_BxT
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = jnp.broadcast_to(jnp.arange(shape[1]), shape)
    seg_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
    return (idx - seg_start).astype(jnp.int32)
  if attention_mask_BxT is not None:
    return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=1) - 1, 0)
  return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


def self_attention_mask(attention_mask_BxT: jax.Array | None, segment_ids_BxT: jax.Array | None,
                        shape: tuple[int, int]) -> jax.Array:
  """[B, T, T] bool: causal, keys must be real tokens, and queries only see their own packed segment."""
  b, t = shape
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  if attention_mask_BxT is not None:
    mask = mask & attention_mask_BxT.astype(bool)[:, None, :]
  if segment_ids_BxT is not None:
    mask = mask & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
  return mask


def dot_product_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
                          mask_BxTxS: jax.Array) -> jax.Array:
  """Grouped-query attention in fp32 softmax; fully-masked rows (padding queries) give finite output."""
  b, t, h, d = q_BxTxHxD.shape
  kv = k_BxSxKxD.shape[2]
  q = q_BxTxHxD.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxD, preferred_element_type=jnp.float32)
  logits = logits * (d ** -0.5)
  logits = jnp.where(mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD)
  return out.reshape(b, t, h * d)


def fused_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_BxTxS: jax.Array, *,
                    causal: bool, implementation: str) -> jax.Array:
  """`jax.nn.dot_product_attention` (GQA native) -> [B, T, H*D]. `causal`: queries and keys are the same
  positions (no cache), so the mask is also lower-triangular and cuDNN may skip the tiles above it."""
  b, t, h, d = q_BxTxHxD.shape
  out = jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask_BxTxS[:, None],
                                     is_causal=causal and t == k_BxSxKxD.shape[1], implementation=implementation)
  return out.reshape(b, t, h * d)


@dataclasses.dataclass(frozen=True)
class _CudnnProbe:
  """The cuDNN call for one signature (forward and backward), hashable for the per-signature compile cache."""

  causal: bool

  def __call__(self, q, k, v, mask):
    def f(q, k, v):
      return fused_attention(q, k, v, mask, causal=self.causal, implementation="cudnn")
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(out)


_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
_WARNED: set[str] = set()


def attention_impl_for(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                       causal: bool) -> str:
  """'xla' | 'cudnn' for this call. An explicit choice is kept; 'auto' picks cuDNN on a GPU for bf16/fp16
  prefill/training shapes (T > 1) once it compiles there, and the reference einsum everywhere else."""
  if impl != "auto":
    return impl
  if target_platform() != "gpu" or jax.default_backend() != "gpu":  # no cuDNN to ask when lowering elsewhere
    return "xla"
  if q.dtype not in _FUSED_DTYPES or q.shape[1] == 1:
    return "xla"
  error = compiles_on_device(_CudnnProbe(causal), *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v, mask)])
  if error is None:
    return "cudnn"
  if error not in _WARNED:
    _WARNED.add(error)
    warnings.warn(f"cuDNN attention does not compile here; using the XLA einsum path: {error[:300]}", RuntimeWarning)
  return "xla"


def attend(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_BxTxS: jax.Array, *,
           impl: str = "xla", causal: bool = False) -> jax.Array:
  """The attention core by implementation (see the module docstring) -> [B, T, H*D]."""
  impl = attention_impl_for(impl, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, causal=causal)
  if impl == "xla":
    return dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)
  if impl != "cudnn":
    raise ValueError(f"unknown attention impl {impl!r}; valid: auto, xla, cudnn")
  implementation = "cudnn" if target_platform() == "gpu" else "xla"
  return fused_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS, causal=causal, implementation=implementation)


class Attention(nn.Module):
  """Multi-head attention block; `cache` is (k, v, mask over cache slots, write index) when decoding."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_BxTxS: jax.Array,
               cache: tuple[jax.Array, jax.Array, jax.Array] | None = None):
    cfg = self.cfg
    b, t, _ = x_BxTxD.shape
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = Linear(h * hd, cfg, use_bias=cfg.qkv_bias, name="q_proj")(x_BxTxD)
    k = Linear(kv * hd, cfg, use_bias=cfg.qkv_bias, name="k_proj")(x_BxTxD)
    v = Linear(kv * hd, cfg, use_bias=cfg.qkv_bias, name="v_proj")(x_BxTxD)
    if cfg.qk_norm == "full":  # OLMoE: one norm over the whole projection
      q = RMSNorm(cfg, name="q_norm")(q)
      k = RMSNorm(cfg, name="k_norm")(k)
    if cfg.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
    q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kv, hd), v.reshape(b, t, kv, hd)
    if cfg.qk_norm == "per_head":  # Qwen3: a norm per head
      q = RMSNorm(cfg, name="q_norm")(q)
      k = RMSNorm(cfg, name="k_norm")(k)
    q = rope(q, positions_BxT, cfg.rope_theta)
    k = rope(k, positions_BxT, cfg.rope_theta)
    new_cache = None
    if cache is not None:
      cache_k, cache_v, index = cache
      k, v = write_cache(cache_k, k, index), write_cache(cache_v, v, index)
      new_cache = (k, v)
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask_BxTxS, impl=cfg.attention_impl,
                 causal=cache is None)
    out = Linear(cfg.hidden_size, cfg, use_bias=cfg.o_bias, name="o_proj")(out)
    return out, new_cache
