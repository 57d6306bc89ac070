"""Pallas grouped matmul for GPUs (Triton lowering): every output block is owned by one program.

GPU grid programs run concurrently, so unlike the TPU kernel (pallas_gmm_tpu.py), which accumulates by
revisiting an output block on consecutive grid steps, each program here computes its whole output block
in registers and writes it once:

  gmm   grid (row tiles, 1, n tiles). Program (t, 0, j) loops over the nonempty groups overlapping row tile
        t (usually one, two at a boundary; precomputed as a [lo, hi) range into the nonempty-group list)
        and, per group, over k in `tile_k` steps: acc += mask_rows(lhs[t, kk]) @ rhs[g, kk, j]. Rows outside
        the group are zeroed before the dot, so a tile shared by two groups sums two disjoint products.
        Row tiles past sum(group_sizes) have an empty range and write zeros. When that grid is too small
        to fill the GPU (decode: m = tokens x k is one row tile spanning k experts), the middle axis splits
        a tile's groups over programs (grid (row tiles, min(G, tile_m), n tiles)): each writes its own fp32
        partial block and the partials are summed after the kernel; still no two programs share a block.
  tgmm  grid (G, k tiles, n tiles). Program (g, a, b) loops over the row tiles covering group g:
        acc += mask_rows(lhs[rows, a])ᵀ @ mask_rows(grad[rows, b]). Empty groups loop zero times -> zeros.

`transpose_rhs=True` multiplies by rhs[g]ᵀ with rhs stored [G, n, k] (the backward's d lhs = g @ w[g]ᵀ) by
loading [tile_n, tile_k] blocks and contracting their last dims, so no transposed copy of the weights is
made in HBM. Operands are whole-array refs in global memory indexed with `pl.ds`, so only the loaded tiles
must be powers of two: k and n must be multiples of a power-of-two tile, which OLMoE (2048, 1024) and
Qwen1.5-MoE (2048, 1408 = 11 x 128) are. The lowering is checked on CPU by exporting for CUDA
(tests/test_pallas.py); the kernels run on CPU under the Pallas interpreter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from phds_jax.kernels.grouped_matmul import group_bounds
from phds_jax.kernels.tiling import dot_precision, pow2_tile, row_tile

__all__ = ["gmm_triton", "tgmm_triton"]

MIN_PROGRAMS = 256  # below this many (row tile, n tile) programs, gmm splits tiles by group (~2 per H100 SM)
MAX_SPLIT_ROWS = 256  # ... if m is at most this: fp32 partials of <= 16 x 16 x 16 = 4096 rows (decode sizes)
MIN_DOT_TILE = 16  # tl.dot needs every dimension >= 16; the interpreter enforces it too, so CPU runs
                   # accept exactly the shapes a GPU would


def _compiler_params(num_warps: int | None, num_stages: int | None):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _mask_rows(x: jax.Array, first_row: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  rows = first_row + lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0)
  return jnp.where((rows >= lo) & (rows < hi), x, jnp.zeros_like(x))


def _tile_group_ranges(bounds, count: int, num_tiles: int, tile_m: int) -> tuple[jax.Array, jax.Array,
                                                                                   jax.Array, jax.Array]:
  """Per row tile, the range [lo, hi) of positions in the nonempty-group list that overlap it, and the
  (start, end) rows of each listed group. Padding positions get start = end = INT32_MAX (never overlap)."""
  big = jnp.iinfo(jnp.int32).max
  listed = jnp.arange(count) < bounds.count
  starts = jnp.where(listed, bounds.starts_G[bounds.nonempty_G], big)
  ends = jnp.where(listed, bounds.ends_G[bounds.nonempty_G], big)
  tile_lo = jnp.arange(num_tiles, dtype=jnp.int32) * tile_m
  lo = jnp.searchsorted(ends, tile_lo, side="right").astype(jnp.int32)  # groups ending at/before the tile
  hi = jnp.searchsorted(starts, tile_lo + tile_m, side="left").astype(jnp.int32)  # starting before its end
  return lo, jnp.maximum(hi, lo), starts, ends


def gmm_triton(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile_m: int = 64,
               tile_k: int = 64, tile_n: int = 128, transpose_rhs: bool = False, interpret: bool = False,
               out_dtype=None, num_warps: int | None = 4, num_stages: int | None = 3,
               split_groups: bool | None = None) -> jax.Array:
  """lhs[m,k] x rhs[G,k,n] (or rhs[G,n,k]ᵀ with transpose_rhs) -> [m,n] in out_dtype (default lhs's).

  `split_groups`: give each (row tile, group) pair its own program, writing an fp32 partial block summed
  afterwards, instead of one program looping over the tile's groups. None: only when the plain grid is too
  small to fill a GPU (decode: 1 row tile x n/tile_n programs would each stream k experts' weights) and
  m <= MAX_SPLIT_ROWS; the heuristic then also uses 16-row tiles. Unmeasured on hardware so far.
  """
  m, k = lhs.shape
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  tm = row_tile(m, tile_m, MIN_DOT_TILE)
  tk, tn = pow2_tile(k, tile_k, "k", MIN_DOT_TILE), pow2_tile(n, tile_n, "n", MIN_DOT_TILE)
  if split_groups is None:  # decode-sized: more programs, smallest row tile (groups of ~1 row each)
    split_groups = m <= MAX_SPLIT_ROWS and pl.cdiv(m, tm) * (n // tn) < MIN_PROGRAMS
    tm = MIN_DOT_TILE if split_groups else tm
  num_tiles = pl.cdiv(m, tm)
  lhs_p = jnp.pad(lhs, ((0, num_tiles * tm - m), (0, 0)))
  bounds = group_bounds(group_sizes, m)
  lo, hi, starts, ends = _tile_group_ranges(bounds, num_groups, num_tiles, tm)
  dt = jnp.promote_types(lhs.dtype, rhs.dtype)  # tl.dot needs equal operand types (e.g. fp32 cotangents)
  precision = dot_precision(dt)
  split = min(num_groups, tm) if split_groups else 1  # a row tile overlaps at most tm nonempty groups

  def kernel(lo_ref, hi_ref, gid_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref):
    t, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first_row = pl.multiple_of(t * tm, tm)
    cols = pl.ds(pl.multiple_of(j * tn, tn), tn)

    def group_step(c, acc):
      g, row_lo, row_hi = gid_ref[c], start_ref[c], end_ref[c]

      def k_step(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * tk, tk), tk)
        x = _mask_rows(lhs_ref[pl.ds(first_row, tm), ks], first_row, row_lo, row_hi).astype(dt)
        w = (rhs_ref[g, cols, ks] if transpose_rhs else rhs_ref[g, ks, cols]).astype(dt)  # [tn,tk] / [tk,tn]
        dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
        return acc + lax.dot_general(x, w, dims, precision=precision, preferred_element_type=jnp.float32)

      return lax.fori_loop(0, k // tk, k_step, acc)

    if split == 1:  # all the tile's groups
      first, last = lo_ref[t], hi_ref[t]
    else:  # its s-th group only (none when s is past the tile's count)
      first = lo_ref[t] + s
      last = jnp.minimum(first + 1, hi_ref[t])
    acc = lax.fori_loop(first, last, group_step, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_tiles, split, tm, n), out_dtype if split == 1 else jnp.float32),
      grid=(num_tiles, split, n // tn),
      out_specs=pl.BlockSpec((None, None, tm, tn), lambda t, s, j: (t, s, 0, j)),
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="phds_gmm",
  )(lo, hi, bounds.nonempty_G, starts, ends, lhs_p, rhs)
  out = out.reshape(num_tiles * tm, n) if split == 1 else out.sum(axis=1).reshape(num_tiles * tm, n)
  return out[:m].astype(out_dtype)


def tgmm_triton(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tile_m: int = 64,
                tile_k: int = 64, tile_n: int = 64, interpret: bool = False, out_dtype=None,
                num_warps: int | None = 4, num_stages: int | None = 3) -> jax.Array:
  """out[g] = lhs_gᵀ grad_g over group g's rows -> [G,k,n] in out_dtype; empty groups are zero."""
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = group_sizes.shape[0]
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  tm = row_tile(m, tile_m, MIN_DOT_TILE)
  tk, tn = pow2_tile(k, tile_k, "k", MIN_DOT_TILE), pow2_tile(n, tile_n, "n", MIN_DOT_TILE)
  rows = pl.cdiv(m, tm) * tm
  lhs_p = jnp.pad(lhs, ((0, rows - m), (0, 0)))
  grad_p = jnp.pad(grad, ((0, rows - m), (0, 0)))
  bounds = group_bounds(group_sizes, m)
  dt = jnp.promote_types(lhs.dtype, grad.dtype)
  precision = dot_precision(dt)

  def kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref):
    g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_lo, row_hi = start_ref[g], end_ref[g]
    ks = pl.ds(pl.multiple_of(a * tk, tk), tk)
    ns = pl.ds(pl.multiple_of(b * tn, tn), tn)

    def row_step(i, acc):
      first_row = pl.multiple_of(i * tm, tm)
      x = _mask_rows(lhs_ref[pl.ds(first_row, tm), ks], first_row, row_lo, row_hi).astype(dt)
      d = _mask_rows(grad_ref[pl.ds(first_row, tm), ns], first_row, row_lo, row_hi).astype(dt)
      return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    first_tile = row_lo // tm
    last_tile = jnp.where(row_hi > row_lo, (row_hi + tm - 1) // tm, first_tile)
    acc = lax.fori_loop(first_tile, last_tile, row_step, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
      grid=(num_groups, k // tk, n // tn),
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
      name="phds_tgmm",
  )(bounds.starts_G, bounds.ends_G, lhs_p, grad_p)
