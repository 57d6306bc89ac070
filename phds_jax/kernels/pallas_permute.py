"""Pallas token permutation kernels (GPU, Triton lowering): the row gather that sorts (token, slot) pairs by
expert, and the inverse permutation fused with the weighted sum over each token's slots.

  gather_rows_pallas(x[R,D], idx[N])                 -> x[idx]                          [N, D]
  weighted_combine_pallas(ys[N,D], inv[T,S], w[T,S]) -> sum_s w[t,s] * ys[inv[t,s]]     [T, D], fp32 sums

The combine never materialises the [T, S, D] un-sorted copy the jnp path builds. Both are gathers of whole
rows with a vector of row ids per program (Triton pointer arithmetic); grids are (row tiles, D tiles) and
every program owns its output block. Mosaic (TPU) has no vector gather from HBM, so `kernels.gather_rows` /
`kernels.weighted_combine` (registry.py) use these on GPU and under the CPU interpreter, and their pure-JAX
twins (permute.py) elsewhere. Forward only: models/experts.py wires them into custom VJPs (the backward of a
gather is a combine and vice versa).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from phds_jax.kernels.tiling import next_pow2, pow2_tile

__all__ = ["gather_rows_pallas", "weighted_combine_pallas"]


def gather_rows_pallas(x_RxD: jax.Array, idx_N: jax.Array, *, tile_rows: int = 32, tile_d: int = 256,
                       interpret: bool = False) -> jax.Array:
  """x[idx] for row ids idx in [0, R)."""
  num_rows, d = idx_N.shape[0], x_RxD.shape[1]
  td = pow2_tile(d, tile_d, "d")
  tr = min(tile_rows, next_pow2(num_rows))
  padded = pl.cdiv(num_rows, tr) * tr
  idx = jnp.pad(idx_N.astype(jnp.int32), (0, padded - num_rows))

  def kernel(idx_ref, x_ref, out_ref):
    r, j = pl.program_id(0), pl.program_id(1)
    rows = idx_ref[pl.ds(pl.multiple_of(r * tr, tr), tr)]
    out_ref[...] = x_ref[rows, pl.ds(pl.multiple_of(j * td, td), td)]

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((padded, d), x_RxD.dtype),
      grid=(padded // tr, d // td),
      out_specs=pl.BlockSpec((tr, td), lambda r, j: (r, j)),
      compiler_params=plgpu.CompilerParams(num_warps=4),
      interpret=interpret,
      name="phds_gather_rows",
  )(idx, x_RxD)
  return out[:num_rows]


def weighted_combine_pallas(ys_NxD: jax.Array, inverse_TxS: jax.Array, weights_TxS: jax.Array, *,
                            out_dtype=None, tile_t: int = 32, tile_d: int = 256,
                            interpret: bool = False) -> jax.Array:
  """out[t] = sum_s weights[t,s] * ys[inverse[t,s]], summed in fp32, cast to out_dtype (default ys's)."""
  num_tokens, slots = inverse_TxS.shape
  d = ys_NxD.shape[1]
  out_dtype = jnp.dtype(out_dtype or ys_NxD.dtype)
  td = pow2_tile(d, tile_d, "d")
  tt = min(tile_t, next_pow2(num_tokens))
  padded = pl.cdiv(num_tokens, tt) * tt
  pad = ((0, padded - num_tokens), (0, 0))
  inverse = jnp.pad(inverse_TxS.astype(jnp.int32), pad)
  weights = jnp.pad(weights_TxS.astype(jnp.float32), pad)

  def kernel(inv_ref, w_ref, ys_ref, out_ref):
    t, j = pl.program_id(0), pl.program_id(1)
    toks = pl.ds(pl.multiple_of(t * tt, tt), tt)
    cols = pl.ds(pl.multiple_of(j * td, td), td)
    acc = jnp.zeros((tt, td), jnp.float32)
    for s in range(slots):  # static: S = k or k_pre is small
      rows = ys_ref[inv_ref[toks, s], cols].astype(jnp.float32)
      acc += rows * w_ref[toks, s][:, None]
    out_ref[...] = acc.astype(out_ref.dtype)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((padded, d), out_dtype),
      grid=(padded // tt, d // td),
      out_specs=pl.BlockSpec((tt, td), lambda t, j: (t, j)),
      compiler_params=plgpu.CompilerParams(num_warps=4),
      interpret=interpret,
      name="phds_weighted_combine",
  )(inverse, weights, ys_NxD)
  return out[:num_tokens]
