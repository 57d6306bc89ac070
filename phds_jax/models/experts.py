"""Routed expert computation as pure functions: sorted dropless dispatch -> grouped matmuls -> combine.

The same functions serve one device and each shard under `shard_map` (expert_parallel.py). A dense masked
reference that reads the same parameters runs every expert on every token; tests hold the sparse path to it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from phds_jax import kernels
from phds_jax.models.layers import swiglu


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

def combine(ys_NxD: jax.Array, order_N: jax.Array, inverse_N: jax.Array, weights_TxS: jax.Array,
            dtype) -> jax.Array:
  """Un-sorts expert outputs back to (token, slot) and sums each token's slots with its routing weights."""
  num_tokens, slots = weights_TxS.shape
  y_TxSxD = permute(ys_NxD, inverse_N, order_N).reshape(num_tokens, slots, -1)
  return jnp.einsum("tsd,ts->td", y_TxSxD.astype(jnp.float32), weights_TxS).astype(dtype)


def routed_experts(x_TxD: jax.Array, weights_TxS: jax.Array, experts_TxS: jax.Array, wi_ExDx2F: jax.Array,
                   wo_ExFxD: jax.Array, *, impl: str = "auto") -> jax.Array:
  """Dropless expert FFN: every (token, slot) is computed by its expert; cost ∝ tokens × slots."""
  order_N, inverse_N, group_sizes_E = sort_by_expert(experts_TxS, wi_ExDx2F.shape[0])
  xs_NxD = dispatch(x_TxD, order_N, inverse_N, experts_TxS.shape[1])
  h_Nx2F = kernels.gmm(xs_NxD, wi_ExDx2F, group_sizes_E, impl=impl)
  ys_NxD = kernels.gmm(swiglu(h_Nx2F), wo_ExFxD, group_sizes_E, impl=impl)
  return combine(ys_NxD, order_N, inverse_N, weights_TxS, x_TxD.dtype)


def routed_experts_dense(x_TxD: jax.Array, weights_TxS: jax.Array, experts_TxS: jax.Array,
                         wi_ExDx2F: jax.Array, wo_ExFxD: jax.Array) -> jax.Array:
  """Reference: all experts on all tokens, combined with the routing's [T, E] weights (zero elsewhere)."""
  num_experts = wi_ExDx2F.shape[0]
  h_ExTx2F = jnp.einsum("td,edf->etf", x_TxD, wi_ExDx2F)
  y_ExTxD = jnp.einsum("etf,efd->etd", swiglu(h_ExTx2F), wo_ExFxD)
  one_hot_TxSxE = jax.nn.one_hot(experts_TxS, num_experts, dtype=jnp.float32)
  w_TxE = jnp.einsum("tse,ts->te", one_hot_TxSxE, weights_TxS)
  return jnp.einsum("etd,te->td", y_ExTxD.astype(jnp.float32), w_TxE).astype(x_TxD.dtype)
