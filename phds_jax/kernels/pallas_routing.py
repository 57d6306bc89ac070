"""Fused Pallas router: softmax + exact top-S + soft/hard slot weights + expert counts in one kernel.

Matches `phds_jax.models.router.route` (weights, experts, expert_load): fp32 softmax over all E experts,
top-S by S rounds of argmax (ties go to the lower expert index, as `lax.top_k`), slots >= k weighted `eps`
in soft mode, renormalisation only if `norm_topk_prob`, counts over the k active slots of real tokens.

Grid: one program per tile of `tile_t` tokens (T padded internally; padded rows are excluded from counts).
Each program writes its own partial counts row, summed outside, so the grid has no cross-step state
(safe on parallel GPU grids too). Blocks are (tile_t, E) / (tile_t, S) / (1, 1, E): the last dims are full,
so Mosaic (TPU) should accept tile_t % 8 == 0 and Triton (GPU) needs tile_t, E, S powers of two. Only the
CPU interpreter is tested here; hardware lowering is untested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from phds_jax.models.router import num_slots

__all__ = ["route_pallas"]


def route_pallas(logits: jax.Array, *, k: int, k_pre: int, mode: str = "hard", eps: float = 1e-6,
                 norm_topk_prob: bool = False, tile_t: int = 8,
                 interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [T,E] -> (weights [T,S] fp32, experts [T,S] int32, expert_counts [E] fp32).

  S = router.num_slots(k, k_pre, mode). `interpret=None`: interpret on CPU.
  """
  num_tokens, num_experts = logits.shape
  slots = num_slots(k, k_pre, mode)
  if slots > num_experts:
    raise ValueError(f"route_pallas: {slots} slots exceed num_experts={num_experts}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  num_tiles = max(pl.cdiv(num_tokens, tile_t), 1)
  padded = num_tiles * tile_t
  if padded != num_tokens:
    logits = jnp.pad(logits, ((0, padded - num_tokens), (0, 0)))

  def kernel(logits_ref, w_ref, e_ref, cnt_ref):
    x = logits_ref[...].astype(jnp.float32)
    ex = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    probs = ex / jnp.sum(ex, axis=-1, keepdims=True)
    expert_iota = jax.lax.broadcasted_iota(jnp.int32, (tile_t, num_experts), 1)
    slot_iota = jax.lax.broadcasted_iota(jnp.int32, (tile_t, slots), 1)
    row = pl.program_id(0) * tile_t + jax.lax.broadcasted_iota(jnp.int32, (tile_t, 1), 0)
    real = (row < num_tokens).astype(jnp.float32)
    weights = jnp.zeros((tile_t, slots), jnp.float32)
    experts = jnp.zeros((tile_t, slots), jnp.int32)
    counts = jnp.zeros((tile_t, num_experts), jnp.float32)
    remaining = probs
    for s in range(slots):  # static unroll: S <= E is small
      best = jnp.max(remaining, axis=-1, keepdims=True)
      idx = jnp.min(jnp.where(remaining == best, expert_iota, num_experts), axis=-1, keepdims=True)
      chosen = expert_iota == idx
      weight = best if s < k else jnp.full_like(best, eps)
      weights = jnp.where(slot_iota == s, weight, weights)
      experts = jnp.where(slot_iota == s, idx, experts)
      if s < k:
        counts = counts + chosen.astype(jnp.float32) * real
      remaining = jnp.where(chosen, -jnp.inf, remaining)
    if norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    w_ref[...] = weights
    e_ref[...] = experts
    cnt_ref[...] = jnp.sum(counts, axis=0, keepdims=True)[None]

  weights, experts, counts = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((padded, slots), jnp.float32),
                 jax.ShapeDtypeStruct((padded, slots), jnp.int32),
                 jax.ShapeDtypeStruct((num_tiles, 1, num_experts), jnp.float32)),
      grid=(num_tiles,),
      in_specs=[pl.BlockSpec((tile_t, num_experts), lambda t: (t, 0))],
      out_specs=(pl.BlockSpec((tile_t, slots), lambda t: (t, 0)),
                 pl.BlockSpec((tile_t, slots), lambda t: (t, 0)),
                 pl.BlockSpec((1, 1, num_experts), lambda t: (t, 0, 0))),
      interpret=interpret,
  )(logits)
  return weights[:num_tokens], experts[:num_tokens], counts.sum(axis=(0, 1))
