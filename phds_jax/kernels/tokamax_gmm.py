"""`tokamax.ragged_dot` behind `kernels.gmm(impl="tokamax")`: Pallas Mosaic GPU (sm90: wgmma, TMA) and Mosaic
TPU grouped matmuls, maintained by the tokamax project.

tokamax needs Python >= 3.12 and jax >= 0.11, so on older stacks (this repo's CPU CI: jax 0.10) it does not
import; then, and wherever it cannot run (CPU, a lowering for another platform, a device its kernels don't
support, a compiler that rejects them), these functions raise NotImplementedError and `kernels.gmm`'s ordered
fallback tries the next implementation. Only tokamax's own kernels are asked for (`implementation="mosaic"`):
its "xla" fallback is `jax.lax.ragged_dot`, which the dispatch table already has. Rows past sum(group_sizes)
are zeroed here, so the contract matches every other implementation whatever the kernel leaves there.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from types import ModuleType

import jax
import jax.numpy as jnp
from jax import lax

from phds_jax.kernels.platform import target_platform
from phds_jax.kernels.probes import Probe, forward_and_backward, require_compiles

__all__ = ["gmm_tokamax", "import_tokamax", "tgmm_tokamax"]


@functools.cache
def _import() -> ModuleType | str:
  try:
    return importlib.import_module("tokamax")
  except Exception as e:  # noqa: BLE001 - ImportError, or a tokamax that fails against this jax
    return (f"tokamax does not import here ({type(e).__name__}: {str(e)[:200]}); it needs Python >= 3.12 and "
            f"jax >= 0.11 (this is Python {sys.version_info.major}.{sys.version_info.minor}, jax {jax.__version__})")


def import_tokamax() -> ModuleType:
  """The tokamax module, or NotImplementedError saying why it is unavailable."""
  mod = _import()
  if isinstance(mod, str):
    raise NotImplementedError(mod)
  return mod


def _check_runnable() -> ModuleType:
  tokamax = import_tokamax()
  platform = target_platform()
  if platform == "cpu":
    raise NotImplementedError("tokamax has no CPU kernel (its CPU path is jax.lax.ragged_dot)")
  if platform != jax.default_backend():
    raise NotImplementedError(f"tokamax picks its kernel from the local device; it cannot lower for {platform!r} "
                              f"from a {jax.default_backend()!r} host")
  return tokamax


@dataclasses.dataclass(frozen=True)
class _Call:
  """A tokamax call with static options, hashable so that compile probes are cached per signature."""

  op: str  # "gmm" | "tgmm"
  out_dtype: str

  def __call__(self, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    tokamax = import_tokamax()
    gs = group_sizes.astype(jnp.int32)
    if self.op == "gmm":
      out = tokamax.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.dtype(self.out_dtype),
                               implementation="mosaic")
      rows_M = jnp.arange(lhs.shape[0], dtype=jnp.int32)
      return jnp.where((rows_M < jnp.sum(gs))[:, None], out, jnp.zeros((), out.dtype))
    dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                         lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return tokamax.ragged_dot_general(lhs, rhs, gs, dims, preferred_element_type=jnp.dtype(self.out_dtype),
                                      implementation="mosaic")


def _require_compiles(call: _Call, *operands: jax.Array, differentiate: bool) -> None:
  """On the device, compile the call (with its VJP for gmm) once per signature before using it inside the
  caller's jit: a kernel its compiler rejects becomes a NotImplementedError, not a failed training step."""
  probe = Probe(("vjp", call), forward_and_backward(call)) if differentiate else call
  require_compiles(probe, *operands, failure=f"tokamax {call.op} does not compile here")


def gmm_tokamax(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                preferred_element_type=None) -> jax.Array:
  """[m,k] x [G,k,n] -> [m,n] by tokamax's Mosaic kernel (differentiable: tokamax defines the VJP)."""
  _check_runnable()
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if lhs.shape[0] == 0:
    return jnp.zeros((0, rhs.shape[2]), out_dtype)
  call = _Call("gmm", out_dtype.name)
  _require_compiles(call, lhs, rhs, group_sizes, differentiate=jnp.issubdtype(lhs.dtype, jnp.floating))
  return call(lhs, rhs, group_sizes)


def tgmm_tokamax(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                 preferred_element_type=None) -> jax.Array:
  """[m,k] x [m,n] -> [G,k,n], out[g] = lhs_gᵀ rhs_g, by tokamax's ragged_dot_general (ragged contraction)."""
  _check_runnable()
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  call = _Call("tgmm", out_dtype.name)
  _require_compiles(call, lhs, rhs, group_sizes, differentiate=False)
  return call(lhs, rhs, group_sizes)
