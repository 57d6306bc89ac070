"""Mixture-of-Experts feed-forward block: router -> dropless sorted dispatch -> grouped matmuls -> combine.

The routed expert computation is a pure function of (tokens, routing, expert weights), so the same code
serves one device and (later) each expert shard under `shard_map`. A dense masked reference that reads the
same parameters runs every expert on every token; tests hold the sparse path to it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from phds_jax import kernels
from phds_jax.models import router as router_lib
from phds_jax.models.config import ModelConfig
from phds_jax.models.layers import MLP, Linear, kernel_init, swiglu


# ----------------------------------------------------------------------------------------------------------
# Permutations with gather-only backward passes (no scatter-add).
# ----------------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch(x_TxD: jax.Array, order_N: jax.Array, inverse_N: jax.Array, slots: int) -> jax.Array:
  """Rows of x for each (token, slot), sorted by expert: out[n] = x[order[n] // slots].

  The backward pass gathers the cotangent with the inverse permutation and sums each token's slots: a
  gather and a reshape, cheaper and deterministic compared with a scatter-add.
  """
  return x_TxD[order_N // slots]


def _dispatch_fwd(x_TxD, order_N, inverse_N, slots):
  return x_TxD[order_N // slots], (inverse_N, x_TxD.shape[0])


def _dispatch_bwd(slots, res, g_NxD):
  inverse_N, num_tokens = res
  g_TxD = g_NxD[inverse_N].reshape(num_tokens, slots, -1).sum(axis=1)
  return g_TxD, None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def permute(x_NxD: jax.Array, perm_N: jax.Array, inverse_N: jax.Array) -> jax.Array:
  """x[perm] for a bijection perm; backward is the gather g[inverse]."""
  return x_NxD[perm_N]


def _permute_fwd(x_NxD, perm_N, inverse_N):
  return x_NxD[perm_N], inverse_N


def _permute_bwd(inverse_N, g_NxD):
  return g_NxD[inverse_N], None, None


permute.defvjp(_permute_fwd, _permute_bwd)


def sort_by_expert(experts_TxS: jax.Array, num_experts: int):
  """Stable order of the flattened (token, slot) pairs by expert id, its inverse, and group sizes [E]."""
  experts_N = experts_TxS.reshape(-1)
  order_N = jnp.argsort(experts_N, stable=True).astype(jnp.int32)
  inverse_N = jnp.zeros_like(order_N).at[order_N].set(jnp.arange(order_N.shape[0], dtype=jnp.int32))
  group_sizes_E = jnp.bincount(experts_N, length=num_experts).astype(jnp.int32)
  return order_N, inverse_N, group_sizes_E


# ----------------------------------------------------------------------------------------------------------
# Routed experts: sparse (production) and dense masked (reference).
# ----------------------------------------------------------------------------------------------------------

def routed_experts(x_TxD: jax.Array, routing: router_lib.Routing, wi_ExDx2F: jax.Array,
                   wo_ExFxD: jax.Array, *, impl: str = "auto") -> jax.Array:
  """Dropless expert FFN: every (token, slot) is computed by its expert; cost ∝ tokens × slots."""
  num_tokens, slots = routing.experts_TxS.shape
  order_N, inverse_N, group_sizes_E = sort_by_expert(routing.experts_TxS, wi_ExDx2F.shape[0])
  xs_NxD = dispatch(x_TxD, order_N, inverse_N, slots)
  h_Nx2F = kernels.gmm(xs_NxD, wi_ExDx2F, group_sizes_E, impl=impl)
  ys_NxD = kernels.gmm(swiglu(h_Nx2F), wo_ExFxD, group_sizes_E, impl=impl)
  y_TxSxD = permute(ys_NxD, inverse_N, order_N).reshape(num_tokens, slots, -1)
  out_TxD = jnp.einsum("tsd,ts->td", y_TxSxD.astype(jnp.float32), routing.weights_TxS)
  return out_TxD.astype(x_TxD.dtype)


def routed_experts_dense(x_TxD: jax.Array, routing: router_lib.Routing, wi_ExDx2F: jax.Array,
                         wo_ExFxD: jax.Array) -> jax.Array:
  """Reference: all experts on all tokens, combined with the routing's [T, E] weights (zero elsewhere)."""
  num_experts = wi_ExDx2F.shape[0]
  h_ExTx2F = jnp.einsum("td,edf->etf", x_TxD, wi_ExDx2F)
  y_ExTxD = jnp.einsum("etf,efd->etd", swiglu(h_ExTx2F), wo_ExFxD)
  w_TxE = router_lib.dense_weights(routing, num_experts)
  return jnp.einsum("etd,te->td", y_ExTxD.astype(jnp.float32), w_TxE).astype(x_TxD.dtype)


class MoeBlock(nn.Module):
  """Router + routed experts (+ Qwen2's sigmoid-gated shared expert). Returns (y, Routing)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, *, k: int, mode: router_lib.RouterMode,
               token_mask_BxT: jax.Array | None = None):
    cfg = self.cfg
    b, t, d = x_BxTxD.shape
    x_TxD = x_BxTxD.reshape(b * t, d)
    e, f = cfg.num_experts, cfg.moe_ffn
    logits_TxE = Linear(e, cfg, name="router")(x_TxD)
    token_mask_T = None if token_mask_BxT is None else token_mask_BxT.reshape(b * t)
    routing = router_lib.route(logits_TxE, k=k, k_pre=cfg.k_pre, mode=mode, eps=cfg.router_eps,
                               norm_topk_prob=cfg.norm_topk_prob, token_mask_T=token_mask_T)
    wi = self.param("wi", kernel_init, (e, d, 2 * f), cfg.weight_dtype).astype(cfg.compute_dtype)
    wo = self.param("wo", kernel_init, (e, f, d), cfg.weight_dtype).astype(cfg.compute_dtype)
    x_TxD = x_TxD.astype(cfg.compute_dtype)
    if cfg.moe_impl == "dense":
      y_TxD = routed_experts_dense(x_TxD, routing, wi, wo)
    else:
      y_TxD = routed_experts(x_TxD, routing, wi, wo, impl=cfg.gmm_impl)
    if cfg.shared_ffn:
      gate_Tx1 = jax.nn.sigmoid(Linear(1, cfg, name="shared_gate")(x_TxD))
      y_TxD = y_TxD + gate_Tx1 * MLP(cfg, cfg.shared_ffn, name="shared")(x_TxD)
    return y_TxD.reshape(b, t, d), routing
