"""The kernel ops callers use: argument checks, then the registry's ordered implementations (registry.py).

  gmm(lhs[m,k], rhs[G,k,n], group_sizes[G]) -> [m,n]      rows [start_g, start_g + size_g) of lhs times rhs[g];
                                                          rows past sum(group_sizes) come out zero
  tgmm(lhs[m,k], rhs[m,n], group_sizes[G]) -> [G,k,n]     out[g] = lhs_gᵀ rhs_g (gmm's weight gradient)
  gather_rows(x[R,D], idx[N]) -> [N,D]                    x[idx]: tokens sorted by expert
  weighted_combine(ys[N,D], inverse[T,S], w[T,S]) -> [T,D]  sum_s w[t,s] * ys[inverse[t,s]], fp32 sums
  route(logits[T,E], token_mask[T]) -> (weights [T,S] fp32, experts [T,S] int32, expert_load [E] fp32)

Grouped matmuls ("auto" picks an order at trace time from a small tuned table per device kind, tuning.py;
the target platform is `jax.default_backend()`, or the one named by `lowering_for` for ahead-of-time
lowering, see platform.py): "tokamax" (tokamax.ragged_dot's Mosaic kernels, tokamax_gmm.py; GPU sm90 and TPU,
needs Python >= 3.12 and jax >= 0.11), "pallas" (pallas_gmm.py: Triton on GPU, Mosaic on TPU, the
interpreter on CPU), "jax" (tiled pure-JAX loops, cost ∝ rows + groups × 16, the CPU default), "ragged_dot"
(`jax.lax.ragged_dot`: native on GPU/TPU, dense over all groups on CPU), "dense" (every row times every
group, masked: O(G·m·k·n), a test reference). On CPU, tiny problems (G·m·k·n <= SMALL_PROBLEM_MACS) try
"ragged_dot" first: there its dense expansion runs within ~0.3 ms of the tiled loops and compiles ~5x faster
(~0.15 s vs ~0.8 s per call site), which is what the CPU test suite's small models pay for.

Routing ops: "jax" (pure JAX: permute.py, routing.py) or "pallas" (pallas_permute.py: Triton on GPU and the
CPU interpreter, jnp on TPU; pallas_routing.py: Triton, Mosaic TPU or the interpreter). Every op is
differentiable except the integer outputs of `route`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phds_jax.kernels.registry import OPS, dispatch, impl_order

__all__ = ["check_gmm_shapes", "check_tgmm_shapes", "gather_rows", "gmm", "route", "tgmm", "weighted_combine"]


def _check_group_sizes(group_sizes: jax.Array, num_groups: int | None, op: str) -> None:
  if group_sizes.ndim != 1 or num_groups not in (None, group_sizes.shape[0]):
    want = "G" if num_groups is None else num_groups
    raise ValueError(f"{op}: group_sizes must have shape ({want},), got {tuple(group_sizes.shape)}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise TypeError(f"{op}: group_sizes must be integer, got {group_sizes.dtype}")


def check_gmm_shapes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
  """lhs [m,k], rhs [G,k,n], group_sizes [G] (integer); raises ValueError/TypeError naming the mismatch."""
  if lhs.ndim != 2:
    raise ValueError(f"gmm: lhs must be 2-D [m, k], got shape {tuple(lhs.shape)}")
  if rhs.ndim != 3:
    raise ValueError(f"gmm: rhs must be 3-D [G, k, n], got shape {tuple(rhs.shape)}")
  if lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"gmm: contracting dims differ: lhs {tuple(lhs.shape)} has k={lhs.shape[1]}, "
                     f"rhs {tuple(rhs.shape)} has k={rhs.shape[1]}")
  _check_group_sizes(group_sizes, rhs.shape[0], "gmm")


def check_tgmm_shapes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
  """lhs [m,k], rhs [m,n], group_sizes [G] (integer)."""
  if lhs.ndim != 2 or rhs.ndim != 2:
    raise ValueError(f"tgmm: lhs and rhs must be 2-D [m, k] and [m, n], got {tuple(lhs.shape)} and "
                     f"{tuple(rhs.shape)}")
  if lhs.shape[0] != rhs.shape[0]:
    raise ValueError(f"tgmm: row counts differ: lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)}")
  _check_group_sizes(group_sizes, None, "tgmm")


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
        tile_m: int | None = None, preferred_element_type=None) -> jax.Array:
  """Grouped matmul [m,k] x [G,k,n] -> [m,n] (rows sorted by group; rows past sum(group_sizes) are zero).

  Accumulates in fp32; output dtype is `preferred_element_type`, else lhs's. `tile_m`: largest row
  window of the tiled implementations (None: their default); others ignore it.
  """
  check_gmm_shapes(lhs, rhs, group_sizes)
  order = impl_order(impl, dense_macs=rhs.shape[0] * lhs.shape[0] * lhs.shape[1] * rhs.shape[2])
  return dispatch("gmm", order, lhs, rhs, group_sizes, tile_m, preferred_element_type)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
         tile_m: int | None = None, preferred_element_type=None) -> jax.Array:
  """Transposed grouped matmul [m,k] x [m,n] -> [G,k,n]: out[g] = lhs_gᵀ rhs_g (gmm's weight gradient)."""
  check_tgmm_shapes(lhs, rhs, group_sizes)
  order = impl_order(impl, dense_macs=group_sizes.shape[0] * lhs.shape[0] * lhs.shape[1] * rhs.shape[1])
  return dispatch("tgmm", order, lhs, rhs, group_sizes, tile_m, preferred_element_type)


def gather_rows(x_RxD: jax.Array, idx_N: jax.Array, *, impl: str = "jax") -> jax.Array:
  """x[idx] (rows)."""
  return dispatch("gather_rows", OPS["gather_rows"].order(impl), x_RxD, idx_N)


def weighted_combine(ys_NxD: jax.Array, inverse_TxS: jax.Array, weights_TxS: jax.Array, *, out_dtype,
                     impl: str = "jax") -> jax.Array:
  """out[t] = sum_s weights[t,s] * ys[inverse[t,s]], summed in fp32, in out_dtype."""
  order = OPS["weighted_combine"].order(impl)
  return dispatch("weighted_combine", order, ys_NxD, inverse_TxS, weights_TxS, out_dtype)


def route(logits_TxE: jax.Array, token_mask_T: jax.Array, *, k: int, slots: int, eps: float,
          norm_topk_prob: bool, impl: str = "jax") -> tuple[jax.Array, jax.Array, jax.Array]:
  """Router selection: fp32 softmax over the E experts, the top `slots` experts per token, their weights
  (slots past `k` weighted `eps`; renormalised if `norm_topk_prob`) and each expert's load over the k
  active slots of the tokens with token_mask_T [T] = 1. Differentiable through the weights."""
  order = OPS["route"].order(impl)
  return dispatch("route", order, logits_TxE, token_mask_T, k, slots, float(eps), bool(norm_topk_prob))
