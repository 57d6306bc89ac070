"""The one gradient rule of a grouped matmul, shared by every implementation that needs its own.

For out = gmm(lhs, rhs, group_sizes): d lhs = gmm(g, rhs[g]ᵀ) and d rhs = tgmm(lhs, g). The residuals are
only (lhs, rhs, group_sizes), and the transposed product reads rhs in place (`transpose_rhs`), so no
transposed copy of the weights is made. The tiled pure-JAX loops (their traced trip counts are not
reverse-differentiable) and the Pallas kernels (forward-only by construction) both take this rule.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

__all__ = ["GmmCall", "TgmmCall", "differentiable_gmm"]

# gmm_call(lhs[m,k], rhs[G,k,n] (or [G,n,k] with transpose_rhs), group_sizes, static, out_dtype, transpose_rhs)
GmmCall = Callable[[jax.Array, jax.Array, jax.Array, Any, Any, bool], jax.Array]
# tgmm_call(lhs[m,k], grad[m,n], group_sizes, static, out_dtype) -> [G,k,n]
TgmmCall = Callable[[jax.Array, jax.Array, jax.Array, Any, Any], jax.Array]


def differentiable_gmm(gmm_call: GmmCall, tgmm_call: TgmmCall) -> Callable:
  """gmm(lhs, rhs, group_sizes, static, out_dtype) -> [m,n] with a custom VJP built from the same two calls.

  `static` (hashable: tiles, a backend, ...) and `out_dtype` are passed through to both calls; the
  gradients come back in lhs's and rhs's dtypes; group_sizes gets none.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
  def gmm(lhs, rhs, group_sizes, static, out_dtype):
    return gmm_call(lhs, rhs, group_sizes, static, out_dtype, False)

  def forward(lhs, rhs, group_sizes, static, out_dtype):
    return gmm_call(lhs, rhs, group_sizes, static, out_dtype, False), (lhs, rhs, group_sizes)

  def backward(static, out_dtype, residuals, g):
    lhs, rhs, group_sizes = residuals
    dlhs = gmm_call(g, rhs, group_sizes, static, lhs.dtype, True)
    drhs = tgmm_call(lhs, g, group_sizes, static, rhs.dtype)
    return dlhs, drhs, None

  gmm.defvjp(forward, backward)
  return gmm
