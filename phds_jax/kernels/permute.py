"""Token permutation in pure JAX: the twins of the Pallas kernels in pallas_permute.py, and what
`kernels.gather_rows` / `kernels.weighted_combine` run where those kernels don't (TPU, impl="jax").

  gather_rows_jax(x[R,D], idx[N])                 -> x[idx]                          [N, D]
  weighted_combine_jax(ys[N,D], inv[T,S], w[T,S]) -> sum_s w[t,s] * ys[inv[t,s]]     [T, D], fp32 sums

The combine materialises the [T, S, D] un-sorted copy that the fused kernel avoids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gather_rows_jax", "weighted_combine_jax"]


def gather_rows_jax(x_RxD: jax.Array, idx_N: jax.Array) -> jax.Array:
  """x[idx] (rows)."""
  return x_RxD[idx_N]


def weighted_combine_jax(ys_NxD: jax.Array, inverse_TxS: jax.Array, weights_TxS: jax.Array, *,
                         out_dtype=None) -> jax.Array:
  """out[t] = sum_s weights[t,s] * ys[inverse[t,s]], summed in fp32, cast to out_dtype (default ys's)."""
  num_tokens, slots = inverse_TxS.shape
  y_TxSxD = ys_NxD[inverse_TxS.reshape(-1)].reshape(num_tokens, slots, -1)
  out_TxD = jnp.einsum("tsd,ts->td", y_TxSxD.astype(jnp.float32), weights_TxS.astype(jnp.float32))
  return out_TxD.astype(ys_NxD.dtype if out_dtype is None else out_dtype)
