"""Compile probes: does a kernel compile on this device for these operands? Asked once per signature.

A kernel the device's compiler rejects (Triton -> PTX, Mosaic, tokamax's Mosaic GPU, cuDNN attention) should
make the caller fall back, not fail inside its jit. So before a kernel is used on a device, the computation
holding it is compiled on its own (safe inside a trace: it is a separate computation), and the answer is
cached per (probe, operand shapes and dtypes). Probes are compared by value (`Probe`'s key, or a frozen
dataclass) so that equal probes built at different call sites share one entry.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable

import jax
import jax.numpy as jnp

__all__ = ["Probe", "compiles_on_device", "forward_and_backward", "require_compiles"]

_COMPILES: dict[tuple, str | None] = {}  # (probe, avals) -> None (compiles) or the compiler's error


def compiles_on_device(fn: Callable, *avals) -> str | None:
  """None if `fn` lowers and compiles for these abstract operands on the default backend, else the error
  message; cached per (fn, avals), fn hashable. Safe inside a trace: it compiles a separate computation."""
  key = (fn, tuple((a.shape, jnp.dtype(a.dtype)) for a in avals))
  if key not in _COMPILES:
    try:
      jax.jit(fn).lower(*avals).compile()
      _COMPILES[key] = None
    except Exception as e:  # noqa: BLE001 - any compiler failure means "don't use this kernel here"
      _COMPILES[key] = f"{type(e).__name__}: {e}"
      logging.warning("a Pallas kernel does not compile on %s for operands %s; falling back: %s",
                      jax.default_backend(), key[1], _COMPILES[key][:500])
  return _COMPILES[key]


def require_compiles(probe: Callable, *operands, failure: str) -> None:
  """Raises NotImplementedError("<failure>: <compiler error>") if `probe` does not compile for the operands'
  shapes and dtypes here (the dispatcher then tries the next implementation)."""
  error = compiles_on_device(probe, *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in operands])
  if error is not None:
    raise NotImplementedError(f"{failure}: {error[:300]}")


class Probe:
  """A function to compile, compared by `key` instead of identity: closures built per call stay one entry."""

  def __init__(self, key: Hashable, fn: Callable):
    self.key, self.fn = key, fn

  def __call__(self, *args):
    return self.fn(*args)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, Probe) and self.key == other.key


def forward_and_backward(fn: Callable) -> Callable:
  """fn(lhs, rhs, group_sizes) and its VJP at its own output w.r.t. lhs and rhs, as one function: compiling
  it compiles every kernel a training step runs (the forward and both backward kernels)."""
  def both(lhs, rhs, group_sizes):
    out, vjp = jax.vjp(lambda a, b: fn(a, b, group_sizes), lhs, rhs)
    return out, vjp(out)
  return both
