"""Grouped-matmul dispatch: one entry point, several implementations tried in order.

`gmm(lhs[m,k], rhs[G,k,n], group_sizes[G]) -> [m,n]` multiplies rows [start_g, start_g + size_g) of lhs by
rhs[g]; rows past sum(group_sizes) come out zero. `tgmm(lhs[m,k], rhs[m,n], group_sizes[G]) -> [G,k,n]` is
its weight-gradient twin. Implementations:

  "tokamax"     tokamax.ragged_dot's Mosaic kernels (tokamax_gmm.py; GPU sm90 and TPU, needs Python >= 3.12
                and jax >= 0.11, otherwise unavailable);
  "pallas"      Pallas kernels (pallas_gmm.py): Triton on GPU, Mosaic on TPU, the interpreter on CPU;
  "jax"         tiled pure-JAX grouped matmul, cost ∝ rows + groups × 16 (the CPU default);
  "ragged_dot"  `jax.lax.ragged_dot`: native on GPU/TPU, dense over all groups on CPU;
  "dense"       every row times every group, masked: O(G·m·k·n), a test reference.

"auto" picks an order at trace time from a small tuned table per device kind (tuning.py; the target platform
is `jax.default_backend()`, or the one named by `lowering_for` for ahead-of-time lowering, see platform.py).
An implementation that cannot handle a case raises NotImplementedError and the next one is tried (with a
warning, once per reason), so later kernels plug in without touching callers. On CPU, tiny problems
(G·m·k·n <= SMALL_PROBLEM_MACS) try "ragged_dot" first: there its dense expansion runs within ~0.3 ms of the
tiled loops and compiles ~5x faster (~0.15 s vs ~0.8 s per call site), which is what the CPU test suite's
small models pay for.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from phds_jax.kernels.grouped_matmul import (gmm_dense, gmm_ragged_dot, gmm_tiled, tgmm_dense,
                                             tgmm_ragged_dot, tgmm_tiled)
from phds_jax.kernels.pallas_gmm import gmm_pallas, tgmm_pallas
from phds_jax.kernels.pallas_permute import gather_rows_pallas, weighted_combine_pallas
from phds_jax.kernels.platform import lowering_for, target_platform
from phds_jax.kernels.tokamax_gmm import gmm_tokamax, tgmm_tokamax
from phds_jax.kernels.tuning import AUTO_ORDERS, SMALL_PROBLEM_MACS, auto_order, device_kind

IMPLS: tuple[str, ...] = ("auto", "tokamax", "pallas", "jax", "ragged_dot", "dense")

__all__ = ["AUTO_ORDERS", "IMPLS", "PERMUTE_IMPLS", "SMALL_PROBLEM_MACS", "auto_order", "device_kind", "dispatch",
           "lowering_for", "target_platform", "gather_rows", "weighted_combine", "gmm", "gmm_dense", "gmm_pallas",
           "gmm_ragged_dot", "gmm_tiled", "gmm_tokamax", "impl_order", "tgmm", "tgmm_dense", "tgmm_pallas",
           "tgmm_ragged_dot", "tgmm_tiled", "tgmm_tokamax"]


def impl_order(impl: str = "auto", backend: str | None = None, dense_macs: int | None = None,
               kind: str | None = None) -> tuple[str, ...]:
  """Implementations to try, in order. For "auto": the tuned table's row (tuning.auto_order) for device
  `kind` on `backend` (defaults: the target platform and its device), and `dense_macs` (G·m·k·n, the cost of
  expanding over all groups) picks the CPU order for tiny problems."""
  if impl not in IMPLS:
    raise ValueError(f"unknown grouped-matmul impl {impl!r}; valid: {', '.join(IMPLS)}")
  if impl != "auto":
    return (impl,)
  return auto_order(backend, kind=kind, dense_macs=dense_macs)


# ----------------------------------------------------------------------------------------------------------
# Implementation tables. Each entry: (lhs, rhs, group_sizes, tile_m, preferred_element_type) -> array.
# ----------------------------------------------------------------------------------------------------------

def _pallas(fn: Callable) -> Callable:
  """Pallas entry: tile_m None -> the backend's default; CPU runs the interpreter (never a CPU "auto"
  choice: too slow)."""
  return lambda x, y, gs, tm, pet: fn(x, y, gs, tile_m=tm, preferred_element_type=pet)


_GMM: dict[str, Callable] = {
    "tokamax": lambda x, w, gs, tm, pet: gmm_tokamax(x, w, gs, preferred_element_type=pet),
    "pallas": _pallas(gmm_pallas),
    "jax": lambda x, w, gs, tm, pet: gmm_tiled(x, w, gs, tile_m=tm, preferred_element_type=pet),
    "ragged_dot": lambda x, w, gs, tm, pet: gmm_ragged_dot(x, w, gs, preferred_element_type=pet),
    "dense": lambda x, w, gs, tm, pet: gmm_dense(x, w, gs, preferred_element_type=pet),
}
_TGMM: dict[str, Callable] = {
    "tokamax": lambda x, d, gs, tm, pet: tgmm_tokamax(x, d, gs, preferred_element_type=pet),
    "pallas": _pallas(tgmm_pallas),
    "jax": lambda x, d, gs, tm, pet: tgmm_tiled(x, d, gs, tile_m=tm, preferred_element_type=pet),
    "ragged_dot": lambda x, d, gs, tm, pet: tgmm_ragged_dot(x, d, gs, preferred_element_type=pet),
    "dense": lambda x, d, gs, tm, pet: tgmm_dense(x, d, gs, preferred_element_type=pet),
}
_OPS = {"gmm": _GMM, "tgmm": _TGMM}


_WARNED: set[tuple[str, str, str]] = set()


def _warn_fallback(op: str, name: str, reason: str, used: str) -> None:
  """Once per (op, impl, reason) per process: a missing kernel is worth knowing about, not per call site."""
  if (op, name, reason) not in _WARNED:
    _WARNED.add((op, name, reason))
    warnings.warn(f"{op}: implementation {name!r} unavailable ({reason[:300]}); using {used!r}", RuntimeWarning,
                  stacklevel=3)


def dispatch(op: str, order: Sequence[str], *args) -> jax.Array:
  """Run `op` ("gmm" or "tgmm") with the first implementation in `order` that doesn't raise NotImplementedError;
  each one skipped before it is reported by a RuntimeWarning."""
  table = _OPS[op]
  skipped: list[tuple[str, str]] = []
  for name in order:
    if name not in table:
      raise ValueError(f"unknown {op} impl {name!r}; valid: {', '.join(IMPLS)}")
    try:
      out = table[name](*args)
    except NotImplementedError as e:
      skipped.append((name, str(e)))
      continue
    for skipped_name, reason in skipped:
      _warn_fallback(op, skipped_name, reason, name)
    return out
  if len(order) == 1:
    raise NotImplementedError(f"{op} impl={order[0]!r} is unavailable ({skipped[0][0]!r}: {skipped[0][1]}); "
                              f"use impl='auto' to fall back")
  reasons = "; ".join(f"{name!r}: {reason}" for name, reason in skipped)
  raise NotImplementedError(f"no {op} implementation in {tuple(order)} handles this case: {reasons}")


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


# ----------------------------------------------------------------------------------------------------------
# Token permutation: row gather and the fused un-permute + weighted slot sum.
# ----------------------------------------------------------------------------------------------------------

PERMUTE_IMPLS: tuple[str, ...] = ("jax", "pallas")


def _permute_kernel_usable(impl: str) -> bool:
  """"pallas" runs the Triton kernels on GPU and the interpreter on CPU; TPU has no vector gather: jnp."""
  if impl not in PERMUTE_IMPLS:
    raise ValueError(f"unknown permutation impl {impl!r}; valid: {', '.join(PERMUTE_IMPLS)}")
  return impl == "pallas" and target_platform() in ("gpu", "cpu")


def gather_rows(x_RxD: jax.Array, idx_N: jax.Array, *, impl: str = "jax") -> jax.Array:
  """x[idx] (rows)."""
  if _permute_kernel_usable(impl):
    try:
      return gather_rows_pallas(x_RxD, idx_N, interpret=target_platform() == "cpu")
    except NotImplementedError:
      pass
  return x_RxD[idx_N]


def weighted_combine(ys_NxD: jax.Array, inverse_TxS: jax.Array, weights_TxS: jax.Array, *, out_dtype,
                     impl: str = "jax") -> jax.Array:
  """out[t] = sum_s weights[t,s] * ys[inverse[t,s]], summed in fp32, in out_dtype."""
  if _permute_kernel_usable(impl):
    try:
      return weighted_combine_pallas(ys_NxD, inverse_TxS, weights_TxS, out_dtype=out_dtype,
                                     interpret=target_platform() == "cpu")
    except NotImplementedError:
      pass
  num_tokens, slots = inverse_TxS.shape
  y_TxSxD = ys_NxD[inverse_TxS.reshape(-1)].reshape(num_tokens, slots, -1)
  return jnp.einsum("tsd,ts->td", y_TxSxD.astype(jnp.float32), weights_TxS.astype(jnp.float32)).astype(out_dtype)
