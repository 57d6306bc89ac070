"""Grouped-matmul dispatch: one entry point, several implementations tried in order.

`gmm(lhs[m,k], rhs[G,k,n], group_sizes[G]) -> [m,n]` multiplies rows [start_g, start_g + size_g) of lhs by
rhs[g]; rows past sum(group_sizes) come out zero. `tgmm(lhs[m,k], rhs[m,n], group_sizes[G]) -> [G,k,n]` is
its weight-gradient twin. Implementations:

  "pallas"      fused GPU/TPU kernels (not written yet: always raises NotImplementedError);
  "jax"         tiled pure-JAX grouped matmul, cost ∝ rows + groups × tile (the CPU default);
  "ragged_dot"  `jax.lax.ragged_dot`: native on GPU/TPU, dense over all groups on CPU;
  "dense"       every row times every group, masked: O(G·m·k·n), a test reference.

"auto" picks an order from `jax.default_backend()` at trace time; an implementation that cannot handle a
case raises NotImplementedError and the next one is tried, so later kernels plug in without touching callers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from phds_jax.kernels.grouped_matmul import (gmm_dense, gmm_ragged_dot, gmm_tiled, tgmm_dense,
                                             tgmm_ragged_dot, tgmm_tiled)

IMPLS: tuple[str, ...] = ("auto", "pallas", "jax", "ragged_dot", "dense")
AUTO_ORDER_CPU: tuple[str, ...] = ("jax", "ragged_dot")
AUTO_ORDER_ACCELERATOR: tuple[str, ...] = ("pallas", "ragged_dot", "jax")
PALLAS_PENDING = "Pallas grouped matmul lands with the kernels issue"

__all__ = ["IMPLS", "dispatch", "gmm", "gmm_dense", "gmm_ragged_dot", "gmm_tiled", "impl_order", "tgmm",
           "tgmm_dense", "tgmm_ragged_dot", "tgmm_tiled"]


def impl_order(impl: str = "auto", backend: str | None = None) -> tuple[str, ...]:
  """Implementations to try, in order; `backend` (default: jax.default_backend()) only matters for "auto"."""
  if impl not in IMPLS:
    raise ValueError(f"unknown grouped-matmul impl {impl!r}; valid: {', '.join(IMPLS)}")
  if impl != "auto":
    return (impl,)
  backend = jax.default_backend() if backend is None else backend
  return AUTO_ORDER_CPU if backend == "cpu" else AUTO_ORDER_ACCELERATOR


# ----------------------------------------------------------------------------------------------------------
# Implementation tables. Each entry: (lhs, rhs, group_sizes, tile_m, preferred_element_type) -> array.
# ----------------------------------------------------------------------------------------------------------

def _pallas_pending(*args, **kwargs):
  raise NotImplementedError(PALLAS_PENDING)


_GMM: dict[str, Callable] = {
    "pallas": _pallas_pending,
    "jax": lambda l, r, g, tm, pet: gmm_tiled(l, r, g, tile_m=tm, preferred_element_type=pet),
    "ragged_dot": lambda l, r, g, tm, pet: gmm_ragged_dot(l, r, g, preferred_element_type=pet),
    "dense": lambda l, r, g, tm, pet: gmm_dense(l, r, g, preferred_element_type=pet),
}
_TGMM: dict[str, Callable] = {
    "pallas": _pallas_pending,
    "jax": lambda l, r, g, tm, pet: tgmm_tiled(l, r, g, tile_m=tm, preferred_element_type=pet),
    "ragged_dot": lambda l, r, g, tm, pet: tgmm_ragged_dot(l, r, g, preferred_element_type=pet),
    "dense": lambda l, r, g, tm, pet: tgmm_dense(l, r, g, preferred_element_type=pet),
}
_OPS = {"gmm": _GMM, "tgmm": _TGMM}


def dispatch(op: str, order: Sequence[str], *args) -> jax.Array:
  """Run `op` ("gmm" or "tgmm") with the first implementation in `order` that doesn't raise NotImplementedError."""
  table = _OPS[op]
  skipped = []
  for name in order:
    if name not in table:
      raise ValueError(f"unknown {op} impl {name!r}; valid: {', '.join(IMPLS)}")
    try:
      return table[name](*args)
    except NotImplementedError as e:
      skipped.append(f"{name!r}: {e}")
  if len(order) == 1:
    raise NotImplementedError(f"{op} impl={order[0]!r} is unavailable ({skipped[0]}); use impl='auto' to fall back")
  raise NotImplementedError(f"no {op} implementation in {tuple(order)} handles this case: {'; '.join(skipped)}")


# ----------------------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------------------

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

  Accumulates in fp32; output dtype is `preferred_element_type`, else lhs's. `tile_m` tunes the tiled
  implementations (None: picked from the shape).
  """
  check_gmm_shapes(lhs, rhs, group_sizes)
  return dispatch("gmm", impl_order(impl), lhs, rhs, group_sizes, tile_m, preferred_element_type)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str = "auto",
         tile_m: int | None = None, preferred_element_type=None) -> jax.Array:
  """Transposed grouped matmul [m,k] x [m,n] -> [G,k,n]: out[g] = lhs_gᵀ rhs_g (gmm's weight gradient)."""
  check_tgmm_shapes(lhs, rhs, group_sizes)
  return dispatch("tgmm", impl_order(impl), lhs, rhs, group_sizes, tile_m, preferred_element_type)
