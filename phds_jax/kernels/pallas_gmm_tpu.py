"""Pallas grouped matmul for TPUs (Mosaic lowering): accumulation by revisiting output blocks.

Design. Rows are cut into row tiles of `tile_m`. Before the kernel (plain jnp, traced with the caller) we
list the static-size set of *work items*: one per (row tile, non-empty group overlapping it), in row-tile
order, plus one item per row tile no group touches (rows past sum(group_sizes)), padded with no-op items to
the static bound num_tiles + G - 1. Five int32 index arrays describe each item (row tile, group, global row
window [lo, hi) to keep, first-visit flag) and are passed as scalar-prefetch operands, so the BlockSpec
index maps can pick the lhs row tile and the rhs[group] tile without any gather.

Accumulation across items that share an output block is done by *revisiting the same output block on
consecutive grid steps* (Mosaic/TPU sequential-grid semantics): the grid is
  gmm:  (n tiles, work items, k tiles)  -> out block (row tile, n tile), zeroed on its first visit;
  tgmm: (k tiles, n tiles, work items)  -> out block (group, k tile, n tile), zeroed on its group's first item.
Items sharing a row tile (gmm) or a group (tgmm) are consecutive by construction. The kernel's output is
fp32 (it doubles as the accumulator) and is cast to the requested dtype outside the kernel.

Lowering. Block shapes are (tile_m, tile_k) / (tile_k, tile_n) / (tile_m, tile_n): TPU Mosaic accepts them
when they are multiples of (8, 128) or the full dim (defaults 128 are). The Mosaic lowering is checked on
CPU by exporting for TPU (tests/test_pallas.py) and the kernels run under the Pallas interpreter; they have
not run on TPU hardware yet. GPU grid programs run in parallel, where revisiting an output block would race:
GPUs use pallas_gmm_triton.py instead.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from phds_jax.kernels.tiling import dot_precision

__all__ = ["WorkItems", "gmm_mosaic", "make_work_items", "tgmm_mosaic"]


class WorkItems(NamedTuple):
  """Per-work-item int32 index arrays, all of static length num_tiles + G - 1."""

  tile: jax.Array  # row tile the item reads/writes.
  group: jax.Array  # group (rhs slice / tgmm output slice); no-op items repeat the previous real group.
  lo: jax.Array  # global row window [lo, hi) kept by the row mask; empty for no-op items.
  hi: jax.Array
  first_tile: jax.Array  # 1 on the first item of each row tile (gmm zeroes its output block there).
  first_group: jax.Array  # 1 on the first item of each group run (tgmm zeroes its output block there).


def make_work_items(group_sizes: jax.Array, num_tiles: int, tile_m: int) -> WorkItems:
  """Static-size (row tile, group) work list; every row tile appears at least once so gmm writes it."""
  num_groups = group_sizes.shape[0]
  num_items = num_tiles + num_groups - 1
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  tile_lo = jnp.arange(num_tiles, dtype=jnp.int32) * tile_m
  overlap = ((sizes > 0)[None, :] & (starts[None, :] < tile_lo[:, None] + tile_m)
             & (ends[None, :] > tile_lo[:, None]))  # [tiles, G]
  count = jnp.maximum(overlap.sum(axis=1, dtype=jnp.int32), 1)  # untouched tiles still get one item
  count_end = jnp.cumsum(count)
  offset = count_end - count
  w = jnp.arange(num_items, dtype=jnp.int32)
  tile = jnp.minimum(jnp.searchsorted(count_end, w, side="right"), num_tiles - 1).astype(jnp.int32)
  in_range = w < count_end[-1]
  j = w - offset[tile]
  rank = jnp.cumsum(overlap, axis=1, dtype=jnp.int32) - 1  # rank of each overlapping group within its tile
  hit = overlap[tile] & (rank[tile] == j[:, None])  # [items, G]
  valid = in_range & hit.any(axis=1)
  group = jax.lax.cummax(jnp.where(valid, jnp.argmax(hit, axis=1).astype(jnp.int32), 0))
  lo = jnp.where(valid, starts[group], 0)
  hi = jnp.where(valid, ends[group], 0)
  first_tile = in_range & (w == offset[tile])
  first_group = jnp.concatenate([jnp.ones((1,), bool), group[1:] != group[:-1]])
  i32 = lambda a: a.astype(jnp.int32)
  return WorkItems(i32(tile), i32(group), i32(lo), i32(hi), i32(first_tile), i32(first_group))


def _tile(dim: int, tile: int, name: str) -> int:
  """Block size along a non-row dim: the whole dim if it fits in one tile, else `tile` (must divide)."""
  if dim <= tile:
    return dim
  if dim % tile:
    raise NotImplementedError(f"pallas gmm: {name}={dim} is not a multiple of tile_{name}={tile}")
  return tile


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _row_mask(x: jax.Array, tile: jax.Array, lo: jax.Array, hi: jax.Array, tile_m: int) -> jax.Array:
  """Zeroes the rows of a row-tile block outside the item's group window [lo, hi)."""
  rows = tile * tile_m + jax.lax.broadcasted_iota(jnp.int32, (tile_m, 1), 0)
  return jnp.where((rows >= lo) & (rows < hi), x, jnp.zeros_like(x))


def gmm_mosaic(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile_m: int = 128, tile_k: int = 128,
               tile_n: int = 128, transpose_rhs: bool = False, interpret: bool = False,
               out_dtype=None) -> jax.Array:
  """lhs[m,k] x rhs[G,k,n] (or rhs[G,n,k]ᵀ) -> [m,n] (rows past sum(group_sizes) zero), fp32 accumulation."""
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tk, tn = _tile(k, tile_k, "k"), _tile(n, tile_n, "n")
  num_tiles = max(pl.cdiv(m, tile_m), 1)
  items = make_work_items(group_sizes, num_tiles, tile_m)
  lhs_p = _pad_rows(lhs, num_tiles * tile_m)
  dt = jnp.promote_types(lhs.dtype, rhs.dtype)  # one operand type for the MXU (e.g. fp32 cotangents)

  def kernel(tile_ref, group_ref, lo_ref, hi_ref, first_ref, lhs_ref, rhs_ref, out_ref):
    w, kk = pl.program_id(1), pl.program_id(2)

    @pl.when((first_ref[w] == 1) & (kk == 0))
    def _():
      out_ref[...] = jnp.zeros_like(out_ref)

    x = _row_mask(lhs_ref[...], tile_ref[w], lo_ref[w], hi_ref[w], tile_m).astype(dt)
    contract = 1 if transpose_rhs else 0  # rhs block is [tn, tk] when transposed, else [tk, tn]
    out_ref[...] += jax.lax.dot_general(x, rhs_ref[...].astype(dt), (((1,), (contract,)), ((), ())),
                                        precision=dot_precision(dt), preferred_element_type=jnp.float32)

  lhs_map = lambda j, w, kk, tile, group, lo, hi, first: (tile[w], kk)
  if transpose_rhs:
    rhs_block, rhs_map = (None, tn, tk), lambda j, w, kk, tile, group, lo, hi, first: (group[w], j, kk)
  else:
    rhs_block, rhs_map = (None, tk, tn), lambda j, w, kk, tile, group, lo, hi, first: (group[w], kk, j)
  out_map = lambda j, w, kk, tile, group, lo, hi, first: (tile[w], j)
  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_tiles * tile_m, n), jnp.float32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(n // tn, items.tile.shape[0], k // tk),
          in_specs=[pl.BlockSpec((tile_m, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tile_m, tn), out_map)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )
  out = call(items.tile, items.group, items.lo, items.hi, items.first_tile, lhs_p, rhs)
  return out[:m].astype(out_dtype)


def tgmm_mosaic(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tile_m: int = 128, tile_k: int = 128,
                tile_n: int = 128, interpret: bool = False, out_dtype=None) -> jax.Array:
  """out[g] = lhs_gᵀ grad_g -> [G,k,n]; empty groups are zero."""
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  m, k = lhs.shape
  n = grad.shape[1]
  num_groups = group_sizes.shape[0]
  tk, tn = _tile(k, tile_k, "k"), _tile(n, tile_n, "n")
  num_tiles = max(pl.cdiv(m, tile_m), 1)
  items = make_work_items(group_sizes, num_tiles, tile_m)
  rows = num_tiles * tile_m
  lhs_p, grad_p = _pad_rows(lhs, rows), _pad_rows(grad, rows)
  dt = jnp.promote_types(lhs.dtype, grad.dtype)

  def kernel(tile_ref, group_ref, lo_ref, hi_ref, first_ref, lhs_ref, grad_ref, out_ref):
    w = pl.program_id(2)

    @pl.when(first_ref[w] == 1)
    def _():
      out_ref[...] = jnp.zeros_like(out_ref)

    x = _row_mask(lhs_ref[...], tile_ref[w], lo_ref[w], hi_ref[w], tile_m).astype(dt)
    out_ref[...] += jax.lax.dot_general(x, grad_ref[...].astype(dt), (((0,), (0,)), ((), ())),
                                        precision=dot_precision(dt), preferred_element_type=jnp.float32)

  lhs_map = lambda kk, j, w, tile, group, lo, hi, first: (tile[w], kk)
  grad_map = lambda kk, j, w, tile, group, lo, hi, first: (tile[w], j)
  out_map = lambda kk, j, w, tile, group, lo, hi, first: (group[w], kk, j)
  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), jnp.float32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(k // tk, n // tn, items.tile.shape[0]),
          in_specs=[pl.BlockSpec((tile_m, tk), lhs_map), pl.BlockSpec((tile_m, tn), grad_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map)),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )
  out = call(items.tile, items.group, items.lo, items.hi, items.first_group, lhs_p, grad_p)
  # Empty groups are never visited (their blocks are uninitialised): select, don't multiply (NaN-safe).
  out = jnp.where((group_sizes > 0)[:, None, None], out, 0.0)
  return out.astype(out_dtype)
