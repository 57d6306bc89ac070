"""Grouped matmuls for dropless MoE in pure JAX: `gmm` (tokens x expert weights) and its twin `tgmm`.

Rows of `lhs` are sorted by group (expert); `group_sizes[g]` consecutive rows belong to group g and rows past
`sum(group_sizes)` belong to none (their output is zero). `jax.lax.ragged_dot` is the reference, but on CPU
XLA expands it densely over all groups (cost ∝ G·m). The tiled path here costs ∝ m + G × MIN_TILE_M rows:

  * an outer `fori_loop` runs over the nonempty groups, slicing each expert's weight once;
  * inside, the group's rows are covered by row windows that start at the group's first row: as many
    `tile_m`-row windows as fit, then MIN_TILE_M-row windows for the remainder. A group costs at most
    size/tile_m + tile_m/MIN_TILE_M dots and wastes fewer than MIN_TILE_M rows (masked), so small
    experts don't pay a full tile;
  * each window is one plain 2-D dot with fp32 accumulation that writes only the group's rows
    (tgmm: adds into the group's [k, n] accumulator). Trip counts are traced, so shapes stay static
    under jit and neither empty groups nor padding cost anything.

Why loops rather than one batched matmul over gathered (row tile, group) pairs (the layout GPU kernels
use): on XLA:CPU the batched dot is a sequence of small single-threaded matmuls over an [items, k, n]
copy of the weights (and a scatter-add for its gradient); the loops' 2-D dots take the fast matmul path
and read the weights in place. Measured 2-7x faster forward, 1-3.5x forward+backward, on 2 cores
(benchmarks/gmm.py keeps the batched variant for comparison).

`gmm_tiled` is differentiated by the shared grouped-matmul rule (gmm_vjp.py: loops with traced trip counts
are not reverse-differentiable; only lhs, rhs and group_sizes are kept): dlhs = gmm(g, rhsᵀ), drhs = tgmm(lhs, g).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from phds_jax.kernels.gmm_vjp import differentiable_gmm
from phds_jax.kernels.platform import target_platform

DEFAULT_TILE_M = 128
MIN_TILE_M = 16


# ----------------------------------------------------------------------------------------------------------
# Windows and group bounds.
# ----------------------------------------------------------------------------------------------------------

def tile_ladder(m: int, tile_m: int | None = None) -> tuple[int, ...]:
  """Window sizes, largest first: (tile_m, MIN_TILE_M), capped at m; tile_m defaults to DEFAULT_TILE_M.

  Two sizes, not a halving ladder: on CPU the big window's size barely matters (16-256 within noise) and
  each extra level costs ~0.1 s of XLA compile per call site.
  """
  tile_m = DEFAULT_TILE_M if tile_m is None else int(tile_m)
  if tile_m < 1:
    raise ValueError(f"tile_m must be positive, got {tile_m}")
  top = max(1, min(tile_m, m))
  return (top, MIN_TILE_M) if top > MIN_TILE_M else (top,)


def num_work_items(m: int, num_groups: int, tile_m: int) -> int:
  """Bound on (row tile, group) pairs in a fixed tile grid: every tile once plus one per group boundary."""
  return -(-m // tile_m) + num_groups - 1


class GroupBounds(NamedTuple):
  """Row range of every group and the nonempty groups, in order (int32)."""

  starts_G: jax.Array  # [G] first row of each group
  ends_G: jax.Array  # [G] one past its last row (clipped to m)
  nonempty_G: jax.Array  # [G] ids of the nonempty groups first, in order; the tail is padding
  count: jax.Array  # [] number of nonempty groups


def group_bounds(group_sizes_G: jax.Array, m: int) -> GroupBounds:
  """Bounds from sizes; the nonempty list lets the loops skip empty experts (common at low top-k)."""
  sizes_G = jnp.maximum(group_sizes_G.astype(jnp.int32), 0)
  ends_G = jnp.minimum(jnp.cumsum(sizes_G), m)  # clipping guards against sum(group_sizes) > m
  starts_G = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
  has_rows_G = ends_G > starts_G
  (nonempty_G,) = jnp.nonzero(has_rows_G, size=group_sizes_G.shape[0], fill_value=0)
  return GroupBounds(starts_G, ends_G, nonempty_G.astype(jnp.int32), has_rows_G.sum(dtype=jnp.int32))


Step = Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array]


def _cover_rows(first: jax.Array, end: jax.Array, m: int, ladder: tuple[int, ...], step: Step, carry):
  """Run step(carry, start, mine_Tx1, tile) over windows covering rows [first, end), largest windows first.

  A window starts at the next uncovered row, moved back if needed to stay inside [0, m); `mine_Tx1` marks
  its rows in [that row, end), so every row of the range is handled exactly once.
  """
  def body_for(tile: int):
    offsets_T = jnp.arange(tile, dtype=jnp.int32)

    def body(_, state):
      carry, row = state
      start = jnp.minimum(row, m - tile)
      rows_T = start + offsets_T
      mine_Tx1 = ((rows_T >= row) & (rows_T < end))[:, None]
      return step(carry, start, mine_Tx1, tile), row + tile

    return body

  row = first
  for level, tile in enumerate(ladder):
    left = end - row
    trips = -(-left // tile) if level == len(ladder) - 1 else left // tile
    carry, row = lax.fori_loop(0, trips, body_for(tile), (carry, row))
  return carry


def _loop_dtype(dtype) -> jnp.dtype:
  """Dtype of the loops' dot operands and carried buffers: at least fp32 on CPU, where XLA's bf16 tile
  updates and matmuls run 2-4x slower than fp32 (measured) and the upcast is exact; unchanged elsewhere."""
  dtype = jnp.dtype(dtype)
  if target_platform() == "cpu" and jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def _out_dtype(x: jax.Array, preferred_element_type) -> jnp.dtype:
  return jnp.dtype(x.dtype if preferred_element_type is None else preferred_element_type)


# ----------------------------------------------------------------------------------------------------------
# Loops.
# ----------------------------------------------------------------------------------------------------------

def _gmm_loop(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, group_sizes_G: jax.Array, ladder: tuple[int, ...],
              out_dtype: jnp.dtype, transpose_rhs: bool = False) -> jax.Array:
  """out[r] = lhs[r] @ rhs[g(r)] (rhs[g]ᵀ when `transpose_rhs`: the backward needs no transposed copy)."""
  m = lhs_MxK.shape[0]
  n = rhs_GxKxN.shape[1] if transpose_rhs else rhs_GxKxN.shape[2]
  bounds = group_bounds(group_sizes_G, m)
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
  dot_dtype = _loop_dtype(jnp.result_type(lhs_MxK, rhs_GxKxN))
  buf_dtype = _loop_dtype(out_dtype)

  def group_body(j, out_MxN):
    g = bounds.nonempty_G[j]
    w = rhs_GxKxN[g].astype(dot_dtype)  # sliced once per group, not per window

    def step(out_MxN, start, mine_Tx1, tile):
      x_TxK = lax.dynamic_slice_in_dim(lhs_MxK, start, tile).astype(dot_dtype)
      y_TxN = lax.dot_general(x_TxK, w, dims, preferred_element_type=jnp.float32).astype(buf_dtype)
      old_TxN = lax.dynamic_slice_in_dim(out_MxN, start, tile)
      return lax.dynamic_update_slice_in_dim(out_MxN, jnp.where(mine_Tx1, y_TxN, old_TxN), start, axis=0)

    return _cover_rows(bounds.starts_G[g], bounds.ends_G[g], m, ladder, step, out_MxN)

  return lax.fori_loop(0, bounds.count, group_body, jnp.zeros((m, n), buf_dtype)).astype(out_dtype)


def _tgmm_loop(lhs_MxK: jax.Array, rhs_MxN: jax.Array, group_sizes_G: jax.Array, ladder: tuple[int, ...],
               out_dtype: jnp.dtype) -> jax.Array:
  """out[g] = Σ over g's rows of lhs[r]ᵀ rhs[r]: one fp32 [k, n] accumulator per group; empty groups zero."""
  m, k = lhs_MxK.shape
  n = rhs_MxN.shape[1]
  bounds = group_bounds(group_sizes_G, m)
  dims = (((0,), (0,)), ((), ()))
  dot_dtype = _loop_dtype(jnp.result_type(lhs_MxK, rhs_MxN))
  buf_dtype = _loop_dtype(out_dtype)

  def step(acc_KxN, start, mine_Tx1, tile):
    # Foreign rows are zeroed in both operands (selected, not multiplied), so inf/NaN there can't leak.
    zero = jnp.zeros((), dot_dtype)
    x_TxK = jnp.where(mine_Tx1, lax.dynamic_slice_in_dim(lhs_MxK, start, tile).astype(dot_dtype), zero)
    d_TxN = jnp.where(mine_Tx1, lax.dynamic_slice_in_dim(rhs_MxN, start, tile).astype(dot_dtype), zero)
    return acc_KxN + lax.dot_general(x_TxK, d_TxN, dims, preferred_element_type=jnp.float32)

  def group_body(j, out_GxKxN):
    g = bounds.nonempty_G[j]
    acc_KxN = _cover_rows(bounds.starts_G[g], bounds.ends_G[g], m, ladder, step, jnp.zeros((k, n), jnp.float32))
    return lax.dynamic_update_index_in_dim(out_GxKxN, acc_KxN.astype(buf_dtype), g, axis=0)

  out_GxKxN = jnp.zeros((group_sizes_G.shape[0], k, n), buf_dtype)
  return lax.fori_loop(0, bounds.count, group_body, out_GxKxN).astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Public tiled ops.
# ----------------------------------------------------------------------------------------------------------

# The loops' trip counts are traced (not reverse-differentiable): the shared grouped-matmul VJP rule.
_gmm_tiled = differentiable_gmm(_gmm_loop, _tgmm_loop)


def gmm_tiled(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile_m: int | None = None,
              preferred_element_type=None) -> jax.Array:
  """Tiled grouped matmul [m,k] x [G,k,n] -> [m,n]; cost ∝ m + nonempty groups × MIN_TILE_M rows.

  tile_m: largest row window (default DEFAULT_TILE_M; each group's remainder uses MIN_TILE_M). fp32
  accumulation; output dtype `preferred_element_type`, else lhs's; rows past sum(group_sizes) are
  zero. Differentiable in lhs and rhs (reverse mode).
  """
  out_dtype = _out_dtype(lhs, preferred_element_type)
  ladder = tile_ladder(lhs.shape[0], tile_m)
  if lhs.shape[0] == 0:
    return jnp.zeros((0, rhs.shape[2]), out_dtype)
  return _gmm_tiled(lhs, rhs, group_sizes, ladder, out_dtype)


def tgmm_tiled(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile_m: int | None = None,
               preferred_element_type=None) -> jax.Array:
  """Tiled transposed grouped matmul [m,k] x [m,n] -> [G,k,n]: out[g] = lhs_gᵀ rhs_g (gmm's weight grad)."""
  out_dtype = _out_dtype(lhs, preferred_element_type)
  ladder = tile_ladder(lhs.shape[0], tile_m)
  if lhs.shape[0] == 0:
    return jnp.zeros((group_sizes.shape[0], lhs.shape[1], rhs.shape[1]), out_dtype)
  return _tgmm_loop(lhs, rhs, group_sizes, ladder, out_dtype)


# ----------------------------------------------------------------------------------------------------------
# References.
# ----------------------------------------------------------------------------------------------------------

def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   preferred_element_type=None) -> jax.Array:
  """`jax.lax.ragged_dot` with fp32 accumulation: native on GPU/TPU, dense over all groups on CPU."""
  out = lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
  return out.astype(_out_dtype(lhs, preferred_element_type))


def tgmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                    preferred_element_type=None) -> jax.Array:
  """`jax.lax.ragged_dot_general` with the ragged dimension contracted: [m,k] x [m,n] -> [G,k,n]."""
  dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                       lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  out = lax.ragged_dot_general(lhs, rhs, group_sizes.astype(jnp.int32), dims,
                               preferred_element_type=jnp.float32)
  return out.astype(_out_dtype(lhs, preferred_element_type))


def group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
  """[m] group of each row; G (one past the last group) for rows past sum(group_sizes)."""
  ends_G = jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0))
  return jnp.searchsorted(ends_G, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm_dense(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
              preferred_element_type=None) -> jax.Array:
  """Reference: every row times every group's weight, selected by a group-id mask. O(G·m·k·n): tests only."""
  onehot_MxG = jax.nn.one_hot(group_ids(group_sizes, lhs.shape[0]), rhs.shape[0], dtype=jnp.float32)
  all_GxMxN = jnp.einsum("mk,gkn->gmn", lhs, rhs, preferred_element_type=jnp.float32)
  out = jnp.einsum("gmn,mg->mn", all_GxMxN, onehot_MxG)
  return out.astype(_out_dtype(lhs, preferred_element_type))


def tgmm_dense(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
               preferred_element_type=None) -> jax.Array:
  """Reference transposed grouped matmul through the same one-hot group mask."""
  onehot_MxG = jax.nn.one_hot(group_ids(group_sizes, lhs.shape[0]), group_sizes.shape[0], dtype=jnp.float32)
  masked_GxMxK = jnp.einsum("mk,mg->gmk", lhs.astype(jnp.float32), onehot_MxG)
  out = jnp.einsum("gmk,mn->gkn", masked_GxMxK, rhs.astype(jnp.float32))
  return out.astype(_out_dtype(lhs, preferred_element_type))
