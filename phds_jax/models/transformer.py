"""Decoder-only MoE transformer; `k` (the top-k level) is a static argument of every call.

    model = build(cfg)
    params = model.init(rng, tokens)['params']          # or phds_jax.hf.load(...)
    logits, aux = model.apply({'params': params}, tokens, k=4)
    logits, aux, cache = model.apply({'params': params}, tokens, k=4, cache=init_cache(cfg, B, L))

Jit with `static_argnames=('k', 'mode')` (see `models/forward.py`): each distinct k compiles once.

Array names end in their shape, one capital letter per axis (`x_BxTxD` is [batch, tokens, hidden]). The letters
mean the same here and in attention.py, moe.py, router.py and experts.py:

    B  batch rows                        H  query heads
    T  tokens of this call (the MoE      G  key/value heads (GQA groups)
       block flattens B·T into T)        R  query heads per group, H / G
    L  key positions: KV-cache slots     K  head dim
       when decoding, T without a cache  E  experts
    D  hidden size                       S  expert slots per token (router)
    V  vocabulary                        F  expert FFN width
    M  MoE layers                        N  (token, slot) pairs, T·S (experts)

Letters written together are one flattened axis (`q_BxTxHK` is [B, T, H*K]); a digit multiplies (`2F`), and
`K2` is K / 2. Lower-case k stays the top-k level (a Python int); in attention, `k_*` and `v_*` are the keys
and values.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phds_jax.models import attention as attn_lib
from phds_jax.models import router as router_lib
from phds_jax.models.config import ModelConfig
from phds_jax.models.layers import MLP, RMSNorm, kernel_init
from phds_jax.models.moe import MoeBlock

Aux = dict[str, jax.Array]


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) with an MoE or a dense MLP."""

  cfg: ModelConfig
  is_moe: bool

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxL, *, k, mode, token_mask, cache=None):
    cfg = self.cfg
    h_BxTxD, new_cache = attn_lib.Attention(cfg, name="attn")(RMSNorm(cfg, name="input_norm")(x_BxTxD),
                                                              positions_BxT, mask_BxTxL, cache)
    x_BxTxD = x_BxTxD + h_BxTxD
    h_BxTxD = RMSNorm(cfg, name="post_attn_norm")(x_BxTxD)
    if self.is_moe:
      h_BxTxD, routing = MoeBlock(cfg, name="moe")(h_BxTxD, k=k, mode=mode, token_mask_BxT=token_mask)
    else:
      b, t, d = h_BxTxD.shape
      h_BxTxD, routing = MLP(cfg, cfg.dense_ffn, name="mlp")(h_BxTxD.reshape(b * t, d)).reshape(b, t, d), None
    return x_BxTxD + h_BxTxD, routing, new_cache


class Transformer(nn.Module):
  """The whole causal LM. Returns fp32 logits and aux statistics averaged over MoE layers."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, *, k: int | None = None, mode: str = "hard",
               positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: attn_lib.KVCache | None = None):
    """Args:
      tokens_BxT: int token ids.
      k: active experts per token (static); default k_pre.
      mode: router mode, 'hard' (inference, compute ∝ k) or 'soft' (PHDS training, ε-weighted slots).
      positions: RoPE positions [B, T]; default counts real tokens (left-padding safe), per segment.
      attention_mask: [B, T] 1 = real token, 0 = padding.
      segment_ids: [B, T] ids of packed examples; attention never crosses segments.
      cache: a KVCache to prefill/extend; then the updated cache is returned third.
    """
    cfg = self.cfg
    k = cfg.k_pre if k is None else k
    router_lib.check_k(k, cfg.num_experts, cfg.k_pre)
    router_lib.num_slots(k, cfg.k_pre, mode)  # validates mode before tracing the layers
    b, t = tokens_BxT.shape
    attention_mask_BxT = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
    positions_BxT = positions
    if cache is None:
      if positions_BxT is None:
        positions_BxT = attn_lib.default_positions(attention_mask_BxT, segment_ids, (b, t))
      mask_BxTxL = attn_lib.self_attention_mask(attention_mask_BxT, segment_ids, (b, t))
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids (packing) is not supported together with a KV cache")
      valid_BxT = attention_mask_BxT.astype(jnp.int32)
      if positions_BxT is None:
        positions_BxT = cache.next_pos[:, None] + jnp.maximum(jnp.cumsum(valid_BxT, axis=1) - 1, 0)
      key_mask_BxL, mask_BxTxL = cached_attention_mask(cache.key_mask, valid_BxT, cache.index)

    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, embedding_init=kernel_init, name="embed")
    x_BxTxD = embed(tokens_BxT)
    routings, new_k, new_v = [], [], []
    for i, is_moe in enumerate(cfg.moe_layers):
      layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.index)
      x_BxTxD, routing, kv = DecoderLayer(cfg, is_moe, name=f"layer_{i}")(
          x_BxTxD, positions_BxT, mask_BxTxL, k=k, mode=mode, token_mask=attention_mask_BxT, cache=layer_cache)
      if routing is not None:
        routings.append(routing)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    x_BxTxD = RMSNorm(cfg, name="final_norm")(x_BxTxD)
    if cfg.tie_embeddings:
      logits_BxTxV = embed.attend(x_BxTxD)
    else:
      logits_BxTxV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype, kernel_init=kernel_init, name="lm_head")(x_BxTxD)
    aux = aux_from_routings(routings, cfg.num_experts)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    if cache is None:
      return logits_BxTxV, aux
    new_cache = attn_lib.KVCache(
        k=tuple(new_k), v=tuple(new_v), key_mask=key_mask_BxL,
        next_pos=cache.next_pos + jnp.sum(valid_BxT, axis=1).astype(jnp.int32), index=cache.index + t)
    return logits_BxTxV, aux, new_cache


def cached_attention_mask(key_mask_BxL: jax.Array, valid_BxT: jax.Array, index: jax.Array):
  """(updated key mask [B, L], attention mask [B, T, L]) for T new tokens written at slot `index`
  (scalar or per row [B]): a query sees real keys up to and including its own slot."""
  t = valid_BxT.shape[1]
  index_B = jnp.broadcast_to(index, key_mask_BxL.shape[:1])
  key_mask_BxL = jax.vmap(lambda m, v, i: jax.lax.dynamic_update_slice(m, v, (i,)))(
      key_mask_BxL, valid_BxT.astype(bool), index_B)
  slots_L = jnp.arange(key_mask_BxL.shape[1])
  causal_BxTxL = slots_L[None, None, :] <= (index_B[:, None] + jnp.arange(t))[:, :, None]
  return key_mask_BxL, key_mask_BxL[:, None, :] & causal_BxTxL


def aux_from_routings(routings: list[router_lib.Routing], num_experts: int) -> Aux:
  """Averages the per-layer router losses; stacks per-layer expert loads [M, E]."""
  if not routings:
    zero = jnp.zeros((), jnp.float32)
    return {"lb_loss": zero, "z_loss": zero, "expert_load": jnp.zeros((0, num_experts), jnp.float32)}
  return {
      "lb_loss": jnp.mean(jnp.stack([r.lb_loss for r in routings])),
      "z_loss": jnp.mean(jnp.stack([r.z_loss for r in routings])),
      "expert_load": jnp.stack([r.expert_load_E for r in routings]),
  }


def build(cfg: ModelConfig) -> Transformer:
  """The Flax module for `cfg` (pure: parameters live outside, in a pytree)."""
  return Transformer(cfg)


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8) -> Any:
  """Random parameters in the HF init scheme (normal(0.02) kernels, unit norms)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.jit(lambda r: build(cfg).init(r, tokens)["params"])(rng)
