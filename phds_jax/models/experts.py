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

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dispatch(x_TxD: jax.Array, order_N: jax.Array, inverse_N: jax.Array, slots: int,
             impl: str = "jax") -> jax.Array:
  """Rows of x for each (token, slot), sorted by expert: out[n] = x[order[n] // slots].

  The backward pass gathers the cotangent with the inverse permutation and sums each token's slots (a
  weighted combine with unit weights): cheaper and deterministic compared with a scatter-add.
  `impl`: "jax" or "pallas" (kernels.gather_rows / weighted_combine).
  """
  return kernels.gather_rows(x_TxD, order_N // slots, impl=impl)


def _dispatch_fwd(x_TxD, order_N, inverse_N, slots, impl):
  return dispatch(x_TxD, order_N, inverse_N, slots, impl), (inverse_N, x_TxD.shape[0])


def _dispatch_bwd(slots, impl, res, g_NxD):
  inverse_N, num_tokens = res
  inverse_TxS = inverse_N.reshape(num_tokens, slots)
  ones_TxS = jnp.ones(inverse_TxS.shape, jnp.float32)
  return kernels.weighted_combine(g_NxD, inverse_TxS, ones_TxS, out_dtype=g_NxD.dtype, impl=impl), None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


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

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def combine(ys_NxD: jax.Array, order_N: jax.Array, inverse_N: jax.Array, weights_TxS: jax.Array,
            dtype, impl: str = "jax") -> jax.Array:
  """Un-sorts expert outputs back to (token, slot) and sums each token's slots with its routing weights.

  Gather-only backward: d ys[n] = w[n] * g[token(n)] (a row gather by order), d w[t,s] = <g[t], ys[inv[t,s]]>.
  """
  inverse_TxS = inverse_N.reshape(weights_TxS.shape)
  return kernels.weighted_combine(ys_NxD, inverse_TxS, weights_TxS, out_dtype=dtype, impl=impl)


def _combine_fwd(ys_NxD, order_N, inverse_N, weights_TxS, dtype, impl):
  out = combine(ys_NxD, order_N, inverse_N, weights_TxS, dtype, impl)
  return out, (ys_NxD, order_N, inverse_N, weights_TxS)


def _combine_bwd(dtype, impl, res, g_TxD):
  ys_NxD, order_N, inverse_N, weights_TxS = res
  num_tokens, slots = weights_TxS.shape
  g_NxD = kernels.gather_rows(g_TxD, order_N // slots, impl=impl).astype(jnp.float32)
  w_N = weights_TxS.reshape(-1)[order_N]
  d_ys = (g_NxD * w_N[:, None]).astype(ys_NxD.dtype)
  y_TxSxD = ys_NxD[inverse_N].reshape(num_tokens, slots, -1).astype(jnp.float32)
  d_w = jnp.einsum("td,tsd->ts", g_TxD.astype(jnp.float32), y_TxSxD).astype(weights_TxS.dtype)
  return d_ys, None, None, d_w


combine.defvjp(_combine_fwd, _combine_bwd)


def routed_experts(x_TxD: jax.Array, weights_TxS: jax.Array, experts_TxS: jax.Array, wi_ExDx2F: jax.Array,
                   wo_ExFxD: jax.Array, *, impl: str = "auto", permute_impl: str = "jax") -> jax.Array:
  """Dropless expert FFN: every (token, slot) is computed by its expert; cost ∝ tokens × slots.

  `impl`: grouped-matmul implementation; `permute_impl`: "jax" | "pallas" for dispatch and combine."""
  order_N, inverse_N, group_sizes_E = sort_by_expert(experts_TxS, wi_ExDx2F.shape[0])
  xs_NxD = dispatch(x_TxD, order_N, inverse_N, experts_TxS.shape[1], permute_impl)
  h_Nx2F = kernels.gmm(xs_NxD, wi_ExDx2F, group_sizes_E, impl=impl)
  ys_NxD = kernels.gmm(swiglu(h_Nx2F), wo_ExFxD, group_sizes_E, impl=impl)
  return combine(ys_NxD, order_N, inverse_N, weights_TxS, x_TxD.dtype, permute_impl)


def routed_experts_gathered(x_TxD: jax.Array, weights_TxS: jax.Array, experts_TxS: jax.Array,
                            wi_ExDx2F: jax.Array, wo_ExFxD: jax.Array, *, loop: bool | None = None) -> jax.Array:
  """Few-token path (decoding): applies each (token, slot)'s expert weights directly, no sort or permutation.

  With T·S <= E it reads at most as many expert weights as the grouped path would, and a decode step is a
  handful of ops per layer instead of sort → gmm → un-permute. Two formulations of the same sum:
  `loop=True` walks the T·S pairs in a `fori_loop`, slicing one expert per iteration (no copy of the weights:
  the fastest on CPU, where a gather of weight matrices is a large copy); `loop=False` gathers the chosen
  experts' matrices and contracts them at once (few kernels: for accelerators, where a loop costs launches).
  Default: the loop on CPU (kernels.target_platform).
  """
  loop = kernels.target_platform() == "cpu" if loop is None else loop
  if not loop:
    h_TxSx2F = jnp.einsum("td,tsdf->tsf", x_TxD, wi_ExDx2F[experts_TxS], preferred_element_type=jnp.float32)
    y_TxSxD = jnp.einsum("tsf,tsfd->tsd", swiglu(h_TxSx2F).astype(x_TxD.dtype), wo_ExFxD[experts_TxS],
                         preferred_element_type=jnp.float32)
    return jnp.einsum("tsd,ts->td", y_TxSxD, weights_TxS.astype(jnp.float32)).astype(x_TxD.dtype)
  num_tokens, num_slots = experts_TxS.shape
  experts_N, weights_N = experts_TxS.reshape(-1), weights_TxS.reshape(-1).astype(jnp.float32)

  def pair(n, acc_TxD):
    t, e = n // num_slots, experts_N[n]
    x_D = jax.lax.dynamic_index_in_dim(x_TxD, t, keepdims=False)
    h_2F = jnp.dot(x_D, jax.lax.dynamic_index_in_dim(wi_ExDx2F, e, keepdims=False),
                   preferred_element_type=jnp.float32)
    y_D = jnp.dot(swiglu(h_2F).astype(x_TxD.dtype), jax.lax.dynamic_index_in_dim(wo_ExFxD, e, keepdims=False),
                  preferred_element_type=jnp.float32)
    return acc_TxD.at[t].add(weights_N[n] * y_D)

  acc_TxD = jax.lax.fori_loop(0, num_tokens * num_slots, pair, jnp.zeros(x_TxD.shape, jnp.float32))
  return acc_TxD.astype(x_TxD.dtype)


def use_gathered(num_tokens: int, num_slots: int, num_experts: int, decode_moe: str) -> bool:
  """Static choice of the few-token path: only when it reads no more weights than all experts hold."""
  return decode_moe == "gather" and num_tokens * num_slots <= num_experts


def routed_experts_dense(x_TxD: jax.Array, weights_TxS: jax.Array, experts_TxS: jax.Array,
                         wi_ExDx2F: jax.Array, wo_ExFxD: jax.Array) -> jax.Array:
  """Reference: all experts on all tokens, combined with the routing's [T, E] weights (zero elsewhere)."""
  num_experts = wi_ExDx2F.shape[0]
  h_ExTx2F = jnp.einsum("td,edf->etf", x_TxD, wi_ExDx2F)
  y_ExTxD = jnp.einsum("etf,efd->etd", swiglu(h_ExTx2F), wo_ExFxD)
  one_hot_TxSxE = jax.nn.one_hot(experts_TxS, num_experts, dtype=jnp.float32)
  w_TxE = jnp.einsum("tse,ts->te", one_hot_TxSxE, weights_TxS)
  return jnp.einsum("etd,te->td", y_ExTxD.astype(jnp.float32), w_TxE).astype(x_TxD.dtype)
