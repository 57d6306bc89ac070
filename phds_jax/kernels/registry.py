"""Every kernel op's implementations in one table per op, and the one rule that runs them: in order, falling
back through NotImplementedError.

  op                 implementations (the impl names accepted by callers)
  gmm, tgmm          auto | tokamax | pallas | jax | ragged_dot | dense       (GMM_IMPLS: ModelConfig.gmm_impl)
  gather_rows        jax | pallas                                            (ROUTING_IMPLS:
  weighted_combine   jax | pallas                                             ModelConfig.routing_impl, one
  route              jax | pallas                                             setting for the three)

An implementation that cannot handle a case raises NotImplementedError and the next one in the order is tried,
with a RuntimeWarning once per (op, implementation, reason) per process; so a new kernel plugs in by adding a
row here, without touching callers. The order for a requested impl:
  * "auto" (gmm, tgmm): the tuned table's row for the device (tuning.py);
  * an explicit name: that implementation, then the op's `fallback` (the routing ops fall back to their
    pure-JAX twin, the grouped matmuls to nothing: an explicit gmm impl that is unavailable raises).
An implementation may also be limited to some target platforms (`Impl.platforms`): elsewhere it is left out
of the order without a warning, because that is by design, not a failure (Mosaic TPU has no vector gather,
so the permutation kernels exist for GPU and the CPU interpreter only).

Every implementation of an op takes the same positional arguments (see `OPS`); the public entry points with
their argument checks are in ops.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Mapping, Sequence

from phds_jax.kernels.grouped_matmul import (gmm_dense, gmm_ragged_dot, gmm_tiled, tgmm_dense, tgmm_ragged_dot,
                                             tgmm_tiled)
from phds_jax.kernels.pallas_gmm import gmm_pallas, tgmm_pallas
from phds_jax.kernels.pallas_permute import gather_rows_pallas, weighted_combine_pallas
from phds_jax.kernels.pallas_routing import route_fused
from phds_jax.kernels.permute import gather_rows_jax, weighted_combine_jax
from phds_jax.kernels.platform import PLATFORMS, target_platform
from phds_jax.kernels.routing import route_jax
from phds_jax.kernels.tokamax_gmm import gmm_tokamax, tgmm_tokamax
from phds_jax.kernels.tuning import auto_order

__all__ = ["GMM_IMPLS", "IMPLS", "OPS", "PERMUTE_IMPLS", "ROUTING_IMPLS", "Impl", "Op", "dispatch", "impl_order"]


@dataclasses.dataclass(frozen=True)
class Impl:
  """One implementation of an op: `fn` takes the op's positional arguments; `platforms`: the target
  platforms it is tried on (elsewhere it is skipped silently)."""

  fn: Callable
  platforms: tuple[str, ...] = PLATFORMS


@dataclasses.dataclass(frozen=True)
class Op:
  """An op's implementations, in the order they are listed to callers."""

  what: str  # the op in error messages
  impls: Mapping[str, Impl]
  auto: Callable[..., tuple[str, ...]] | None = None  # the order for impl="auto"; None: no "auto"
  fallback: tuple[str, ...] = ()  # tried, in order, after an explicitly requested implementation

  @property
  def names(self) -> tuple[str, ...]:
    """The impl names a caller may ask for."""
    return (("auto",) if self.auto else ()) + tuple(self.impls)

  def order(self, impl: str, **auto_args) -> tuple[str, ...]:
    """Implementations to try for a requested `impl`, in order (`auto_args` go to the "auto" rule)."""
    if impl not in self.names:
      raise ValueError(f"unknown {self.what} impl {impl!r}; valid: {', '.join(self.names)}")
    if impl == "auto":
      return self.auto(**auto_args)
    return (impl,) + tuple(name for name in self.fallback if name != impl)


# ----------------------------------------------------------------------------------------------------------
# The tables. Grouped matmuls: (lhs, rhs, group_sizes, tile_m, preferred_element_type) -> array; tile_m is
# the largest row window of the tiled implementations (None: their default), the Pallas one's row tile.
# ----------------------------------------------------------------------------------------------------------

def _gmm_auto(backend: str | None = None, dense_macs: int | None = None, kind: str | None = None):
  return auto_order(backend, kind=kind, dense_macs=dense_macs)


def _gather_rows_kernel(x_RxD, idx_N):
  """The Pallas gather: natively on GPU, under the interpreter on CPU."""
  return gather_rows_pallas(x_RxD, idx_N, interpret=target_platform() == "cpu")


def _weighted_combine_kernel(ys_NxD, inverse_TxS, weights_TxS, out_dtype):
  """The fused Pallas un-permute + weighted sum: natively on GPU, under the interpreter on CPU."""
  return weighted_combine_pallas(ys_NxD, inverse_TxS, weights_TxS, out_dtype=out_dtype,
                                 interpret=target_platform() == "cpu")


def _grouped_matmul_op(tokamax: Callable, pallas: Callable, tiled: Callable, ragged_dot: Callable,
                       dense: Callable) -> Op:
  """gmm and tgmm share one table shape: (lhs, rhs, group_sizes, tile_m, preferred_element_type) -> array."""
  return Op("grouped-matmul", {
      "tokamax": Impl(lambda x, y, gs, tm, pet: tokamax(x, y, gs, preferred_element_type=pet)),
      # CPU runs the interpreter: correct but slow, so it is never in a CPU "auto" order (tuning.py).
      "pallas": Impl(lambda x, y, gs, tm, pet: pallas(x, y, gs, tile_m=tm, preferred_element_type=pet)),
      "jax": Impl(lambda x, y, gs, tm, pet: tiled(x, y, gs, tile_m=tm, preferred_element_type=pet)),
      "ragged_dot": Impl(lambda x, y, gs, tm, pet: ragged_dot(x, y, gs, preferred_element_type=pet)),
      "dense": Impl(lambda x, y, gs, tm, pet: dense(x, y, gs, preferred_element_type=pet)),
  }, auto=_gmm_auto)


_GMM = _grouped_matmul_op(gmm_tokamax, gmm_pallas, gmm_tiled, gmm_ragged_dot, gmm_dense)
_TGMM = _grouped_matmul_op(tgmm_tokamax, tgmm_pallas, tgmm_tiled, tgmm_ragged_dot, tgmm_dense)

# Routing: gather_rows (x[R,D], idx[N]); weighted_combine (ys[N,D], inverse[T,S], weights[T,S], out_dtype);
# route (logits[T,E], token_mask[T], k, slots, eps, norm_topk_prob). "pallas" falls back to the twin.
_PERMUTE_KERNEL_PLATFORMS = ("gpu", "cpu")  # Triton on GPU and the interpreter on CPU; TPU: no vector gather
_GATHER_ROWS = Op("permutation", {
    "jax": Impl(gather_rows_jax),
    "pallas": Impl(_gather_rows_kernel, _PERMUTE_KERNEL_PLATFORMS),
}, fallback=("jax",))
_WEIGHTED_COMBINE = Op("permutation", {
    "jax": Impl(lambda ys, inv, w, out_dtype: weighted_combine_jax(ys, inv, w, out_dtype=out_dtype)),
    "pallas": Impl(_weighted_combine_kernel, _PERMUTE_KERNEL_PLATFORMS),
}, fallback=("jax",))
_ROUTE = Op("router", {
    "jax": Impl(lambda z, m, k, s, eps, norm: route_jax(z, m, k=k, slots=s, eps=eps, norm_topk_prob=norm)),
    "pallas": Impl(route_fused),  # Triton on GPU, Mosaic on TPU, the interpreter on CPU
}, fallback=("jax",))

OPS: dict[str, Op] = {"gmm": _GMM, "tgmm": _TGMM, "gather_rows": _GATHER_ROWS,
                      "weighted_combine": _WEIGHTED_COMBINE, "route": _ROUTE}

# The impl names, defined here once (models/config.py and the training config checks import them).
GMM_IMPLS: tuple[str, ...] = _GMM.names
ROUTING_IMPLS: tuple[str, ...] = _ROUTE.names
IMPLS = GMM_IMPLS  # older names of the same tuples
PERMUTE_IMPLS = ROUTING_IMPLS


def impl_order(impl: str = "auto", backend: str | None = None, dense_macs: int | None = None,
               kind: str | None = None) -> tuple[str, ...]:
  """Grouped-matmul implementations to try, in order. For "auto": the tuned table's row (tuning.auto_order)
  for device `kind` on `backend` (defaults: the target platform and its device), and `dense_macs` (G·m·k·n,
  the cost of expanding over all groups) picks the CPU order for tiny problems."""
  return _GMM.order(impl, backend=backend, dense_macs=dense_macs, kind=kind)


# ----------------------------------------------------------------------------------------------------------
# Running an order.
# ----------------------------------------------------------------------------------------------------------

_WARNED: set[tuple[str, str, str]] = set()


def _warn_fallback(op: str, name: str, reason: str, used: str) -> None:
  """Once per (op, impl, reason) per process: a missing kernel is worth knowing about, not per call site."""
  if (op, name, reason) not in _WARNED:
    _WARNED.add((op, name, reason))
    warnings.warn(f"{op}: implementation {name!r} unavailable ({reason[:300]}); using {used!r}", RuntimeWarning,
                  stacklevel=3)


def dispatch(op: str, order: Sequence[str], *args):
  """Run `op` (a key of OPS) with the first implementation in `order` that doesn't raise
  NotImplementedError; each one skipped before it is reported by a RuntimeWarning. Implementations not
  meant for the target platform are left out silently."""
  table = OPS[op]
  platform = target_platform()
  skipped: list[tuple[str, str]] = []
  for name in order:
    if name not in table.impls:
      raise ValueError(f"unknown {op} impl {name!r}; valid: {', '.join(table.names)}")
    impl = table.impls[name]
    if platform not in impl.platforms:
      continue
    try:
      out = impl.fn(*args)
    except NotImplementedError as e:
      skipped.append((name, str(e)))
      continue
    for skipped_name, reason in skipped:
      _warn_fallback(op, skipped_name, reason, name)
    return out
  if not skipped:
    raise NotImplementedError(f"no {op} implementation in {tuple(order)} runs on {platform!r}")
  if len(order) == 1:
    hint = "; use impl='auto' to fall back" if table.auto else ""
    raise NotImplementedError(f"{op} impl={order[0]!r} is unavailable ({skipped[0][0]!r}: {skipped[0][1]}){hint}")
  reasons = "; ".join(f"{name!r}: {reason}" for name, reason in skipped)
  raise NotImplementedError(f"no {op} implementation in {tuple(order)} handles this case: {reasons}")

