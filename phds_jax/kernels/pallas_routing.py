"""Fused Pallas router: softmax + exact top-S + soft/hard slot weights + expert counts in one kernel.

Matches its pure-JAX twin `routing.route_jax` (weights, experts, expert_load): fp32 softmax over all E
experts, top-S by S rounds of argmax (ties go to the lower expert index, as `lax.top_k`), slots >= k weighted
`eps` in soft mode, renormalisation only if `norm_topk_prob`, counts over the k active slots of unmasked
tokens. `kernels.route(..., impl="pallas")` runs it (through `route_fused`); models/router.py stays the one
place k is interpreted.

Grid: one program per tile of `tile_t` tokens (T padded internally; padded rows are excluded from counts).
Each program writes its own partial counts row, summed outside, so the grid has no cross-step state and is
safe on parallel GPU grids. Experts and slots are padded to powers of two (Triton tensors must be): padded
experts get logit -inf (probability 0, and they lose every tie to a real expert), padded slots are sliced
off. Blocks are (tile_t, E') / (tile_t, S') / (1, 1, E') with full last dims, which Mosaic (TPU) accepts
for tile_t % 8 == 0. Lowerings for CUDA and TPU are checked on CPU by exporting (tests/test_pallas.py).

`route_pallas` is forward only; `route_fused` differentiates it with a custom VJP that re-derives the weights
from the chosen experts in jnp (`routing.slot_weights`; experts and counts are integer-valued and carry no
gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from phds_jax.kernels.platform import pallas_family, target_platform
from phds_jax.kernels.routing import slot_weights
from phds_jax.kernels.tiling import next_pow2

__all__ = ["route_fused", "route_pallas"]


def _route_kernel(logits_ref, mask_ref, w_ref, e_ref, cnt_ref, *, k, slots, num_experts, eps,
                  norm_topk_prob):
  x = logits_ref[...].astype(jnp.float32)
  tile_t, width = x.shape
  ex = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  probs = ex / jnp.sum(ex, axis=-1, keepdims=True)
  expert_iota = jax.lax.broadcasted_iota(jnp.int32, (tile_t, width), 1)
  slot_iota = jax.lax.broadcasted_iota(jnp.int32, w_ref.shape, 1)
  real = mask_ref[...]  # [tile_t, 1] fp32: 1 for counted tokens
  weights = jnp.zeros(w_ref.shape, jnp.float32)
  experts = jnp.zeros(e_ref.shape, jnp.int32)
  counts = jnp.zeros((tile_t, width), jnp.float32)
  remaining = probs
  for s in range(slots):  # static unroll: S <= E is small
    best = jnp.max(remaining, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(remaining == best, expert_iota, width), axis=-1, keepdims=True)
    chosen = expert_iota == idx
    weight = best if s < k else jnp.full_like(best, eps)
    weights = jnp.where(slot_iota == s, weight, weights)
    experts = jnp.where(slot_iota == s, idx, experts)
    if s < k:
      counts = counts + jnp.where(chosen, real, 0.0)
    remaining = jnp.where(chosen, -1.0, remaining)  # below every probability, padded experts' 0 included
  if norm_topk_prob:
    weights = weights / jnp.sum(jnp.where(slot_iota < slots, weights, 0.0), axis=-1, keepdims=True)
  w_ref[...] = weights
  e_ref[...] = experts
  cnt_ref[...] = jnp.sum(counts, axis=0, keepdims=True)[None]


def _compiler_params(backend: str | None):
  """Triton's params make pallas_call lower with Triton on GPU (jax's GPU default is Mosaic GPU)."""
  backend = backend or pallas_family()
  if backend not in ("triton", "mosaic_tpu"):
    raise ValueError(f"route_pallas: unknown backend {backend!r}; valid: triton, mosaic_tpu")
  return plgpu.CompilerParams(num_warps=4) if backend == "triton" else None


def _route_call(logits, token_mask, k, slots, eps, norm_topk_prob, tile_t, interpret, backend):
  num_tokens, num_experts = logits.shape
  width, slot_width = next_pow2(num_experts), next_pow2(slots)
  num_tiles = max(pl.cdiv(num_tokens, tile_t), 1)
  padded = num_tiles * tile_t
  logits = jnp.pad(logits.astype(jnp.float32), ((0, padded - num_tokens), (0, width - num_experts)),
                   constant_values=-jnp.inf)
  logits = logits.at[num_tokens:].set(0.0)  # padded tokens: finite rows, excluded from counts below
  mask = jnp.pad(token_mask.astype(jnp.float32), (0, padded - num_tokens))[:, None]
  kernel = functools.partial(_route_kernel, k=k, slots=slots, num_experts=num_experts, eps=eps,
                             norm_topk_prob=norm_topk_prob)
  weights, experts, counts = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((padded, slot_width), jnp.float32),
                 jax.ShapeDtypeStruct((padded, slot_width), jnp.int32),
                 jax.ShapeDtypeStruct((num_tiles, 1, width), jnp.float32)),
      grid=(num_tiles,),
      in_specs=[pl.BlockSpec((tile_t, width), lambda t: (t, 0)), pl.BlockSpec((tile_t, 1), lambda t: (t, 0))],
      out_specs=(pl.BlockSpec((tile_t, slot_width), lambda t: (t, 0)),
                 pl.BlockSpec((tile_t, slot_width), lambda t: (t, 0)),
                 pl.BlockSpec((1, 1, width), lambda t: (t, 0, 0))),
      compiler_params=_compiler_params(backend),
      interpret=interpret,
      name="phds_router",
  )(logits, mask)
  return (weights[:num_tokens, :slots], experts[:num_tokens, :slots],
          counts.sum(axis=(0, 1))[:num_experts])


def route_pallas(logits: jax.Array, *, k: int, slots: int, eps: float = 1e-6, norm_topk_prob: bool = False,
                 token_mask: jax.Array | None = None, tile_t: int = 64, backend: str | None = None,
                 interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """logits [T,E] -> (weights [T,S] fp32, experts [T,S] int32, expert_counts [E] fp32).

  `slots` = router.num_slots(k, k_pre, mode): slots >= k get weight `eps`. `token_mask` [T] (1 = count
  the token). `backend`: "triton" | "mosaic_tpu" (None: the platform's). `interpret=None`: interpret on CPU.
  Not differentiable by itself (see `route_fused`).
  """
  num_tokens, num_experts = logits.shape
  if not 1 <= k <= slots <= num_experts:
    raise ValueError(f"route_pallas: need 1 <= k={k} <= slots={slots} <= num_experts={num_experts}")
  if tile_t % 8:
    raise ValueError(f"route_pallas: tile_t={tile_t} must be a multiple of 8")
  if interpret is None:
    interpret = target_platform() == "cpu"
  tile_t = min(tile_t, max(8, next_pow2(num_tokens)))  # don't pad a decode step to a whole tile
  if token_mask is None:
    token_mask = jnp.ones((num_tokens,), jnp.float32)
  return _route_call(logits, token_mask, k, slots, float(eps), bool(norm_topk_prob), tile_t, bool(interpret),
                     backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def route_fused(logits_TxE: jax.Array, token_mask_T: jax.Array, k: int, slots: int, eps: float,
                norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`route_pallas` (weights, experts, expert_load), differentiable through the weights."""
  return route_pallas(logits_TxE, k=k, slots=slots, eps=eps, norm_topk_prob=norm_topk_prob,
                      token_mask=token_mask_T)


def _route_fused_fwd(logits_TxE, token_mask_T, k, slots, eps, norm_topk_prob):
  out = route_fused(logits_TxE, token_mask_T, k, slots, eps, norm_topk_prob)
  return out, (logits_TxE, token_mask_T, out[1])


def _route_fused_bwd(k, slots, eps, norm_topk_prob, res, cotangents):
  """The weights' VJP, re-derived in jnp from the experts the kernel chose."""
  logits_TxE, token_mask_T, experts_TxS = res

  def weights_of(logits):
    probs_TxE = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_p_TxS = jnp.take_along_axis(probs_TxE, experts_TxS, axis=-1)
    return slot_weights(top_p_TxS, k=k, eps=eps, norm_topk_prob=norm_topk_prob)

  _, vjp = jax.vjp(weights_of, logits_TxE)
  return vjp(cotangents[0])[0], jnp.zeros_like(token_mask_T)


route_fused.defvjp(_route_fused_fwd, _route_fused_bwd)
