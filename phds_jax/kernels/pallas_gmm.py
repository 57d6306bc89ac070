"""Pallas grouped matmul (`gmm_pallas`) and its weight-gradient twin (`tgmm_pallas`), with a custom VJP.

Two kernel families share this entry point, because GPUs and TPUs disagree on how a grid runs:
  "triton"      (pallas_gmm_triton.py) GPUs: programs run concurrently, so each owns its output block and
                loops over groups / k / rows inside the kernel;
  "mosaic_tpu"  (pallas_gmm_tpu.py) TPUs: the grid is a sequential loop, so items sharing an output block
                accumulate into it on consecutive steps and Mosaic pipelines the block DMAs.
`backend=None` picks from the target platform (kernels/platform.py); on CPU both run under the Pallas interpreter ("triton"
by default). The backward pass is the same for both: d lhs = gmm(g, rhs[g]ᵀ) without a transposed copy of
the weights (`transpose_rhs`), d rhs = tgmm(lhs, g). Residuals are only (lhs, rhs, group_sizes).

On a device, the first call for each operand signature compiles the kernels (forward and both backward
kernels) on their own before they are used (`compiles_on_device`, cached). A kernel that the device's
compiler rejects (Triton -> PTX, Mosaic -> TPU run only there) then raises NotImplementedError with the
compiler's message, so `kernels.gmm(impl="auto")` falls through to ragged_dot with a warning instead of
failing inside the caller's jit.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from phds_jax.kernels.pallas_gmm_tpu import gmm_mosaic, tgmm_mosaic
from phds_jax.kernels.pallas_gmm_triton import gmm_triton, tgmm_triton
from phds_jax.kernels.platform import pallas_family, target_platform

__all__ = ["BACKENDS", "gmm_pallas", "resolve_backend", "tgmm_pallas"]

BACKENDS: tuple[str, ...] = ("triton", "mosaic_tpu")
_KERNELS = {"triton": (gmm_triton, tgmm_triton), "mosaic_tpu": (gmm_mosaic, tgmm_mosaic)}
# Tiles (m, k, n) per backend and op when the caller gives none. Triton: fp32 accumulator of 64x128 in
# registers with 4 warps; Mosaic: (8, 128)-aligned 128-blocks for the MXU.
DEFAULT_TILES = {
    ("triton", "gmm"): (64, 64, 128), ("triton", "tgmm"): (64, 64, 64),
    ("mosaic_tpu", "gmm"): (128, 128, 128), ("mosaic_tpu", "tgmm"): (128, 128, 128),
}


def resolve_backend(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
  """(kernel family, interpret): the platform's family unless named; interpret by default only on CPU.

  Raises NotImplementedError where the family can't lower (the dispatcher then tries the next impl).
  """
  platform = target_platform()
  if backend is None:
    backend = pallas_family(platform)
  if backend not in BACKENDS:
    raise ValueError(f"unknown pallas gmm backend {backend!r}; valid: {', '.join(BACKENDS)}")
  if interpret is None:
    interpret = platform == "cpu"
  native = {"triton": "gpu", "mosaic_tpu": "tpu"}[backend]
  if not interpret and platform != native:
    raise NotImplementedError(f"pallas gmm backend {backend!r} lowers only on {native}, not on {platform!r}")
  return backend, interpret


def _tiles(backend: str, op: str, tile_m, tile_k, tile_n) -> dict:
  dm, dk, dn = DEFAULT_TILES[backend, op]
  return dict(tile_m=tile_m or dm, tile_k=tile_k or dk, tile_n=tile_n or dn)


def _gmm_call(lhs, rhs, group_sizes, opts, out_dtype, transpose_rhs=False):
  backend, interpret, tile_m, tile_k, tile_n = opts
  kernel = _KERNELS[backend][0]
  return kernel(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, interpret=interpret, out_dtype=out_dtype,
                **_tiles(backend, "gmm", tile_m, tile_k, tile_n))


def _tgmm_call(lhs, grad, group_sizes, opts, out_dtype):
  backend, interpret, tile_m, tile_k, tile_n = opts
  kernel = _KERNELS[backend][1]
  return kernel(lhs, grad, group_sizes, interpret=interpret, out_dtype=out_dtype,
                **_tiles(backend, "tgmm", tile_m, tile_k, tile_n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, opts, out_dtype):
  return _gmm_call(lhs, rhs, group_sizes, opts, out_dtype)


def _gmm_fwd(lhs, rhs, group_sizes, opts, out_dtype):
  return _gmm_call(lhs, rhs, group_sizes, opts, out_dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(opts, out_dtype, res, g):
  lhs, rhs, group_sizes = res
  backend, interpret, tile_m, tile_k, tile_n = opts
  # d lhs contracts over n: the forward's tile_n becomes the contraction tile and tile_k the output tile.
  dlhs = _gmm_call(g, rhs, group_sizes, (backend, interpret, tile_m, tile_n, tile_k), lhs.dtype,
                   transpose_rhs=True)
  drhs = _tgmm_call(lhs, g, group_sizes, opts, rhs.dtype)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


_COMPILES: dict[tuple, str | None] = {}  # signature -> None (compiles) or the compiler's error


def compiles_on_device(fn, *avals) -> str | None:
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


class _Probe:
  """A kernel call to probe, hashed by (name, opts, out_dtype) so equal probes share one cache entry."""

  def __init__(self, name, fn, opts, out_dtype):
    self.fn, self.key = fn, (name, opts, jnp.dtype(out_dtype).name)

  def __call__(self, *args):
    return self.fn(*args)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Probe) and self.key == other.key


def _require_compiles(probe: _Probe, *operands) -> None:
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in operands]
  error = compiles_on_device(probe, *avals)
  if error is not None:
    raise NotImplementedError(f"pallas {probe.key[0]} kernels do not compile here: {error[:300]}")


def _gmm_fwd_and_bwd(opts, out_dtype):
  """The forward and both backward kernels (gmm with rhsᵀ, tgmm), as one function to compile."""
  def fn(x, w, gs):
    out, vjp = jax.vjp(lambda a, b: _gmm(a, b, gs, opts, out_dtype), x, w)
    return out, vjp(out)
  return _Probe("gmm", fn, opts, out_dtype)


def _check_groups(num_groups: int) -> None:
  if num_groups == 0:
    raise NotImplementedError("pallas gmm needs at least one group")


def gmm_pallas(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile_m: int | None = None,
               tile_k: int | None = None, tile_n: int | None = None, backend: str | None = None,
               interpret: bool | None = None, preferred_element_type=None) -> jax.Array:
  """Grouped matmul lhs[m,k] x rhs[G,k,n] -> [m,n]; rows past sum(group_sizes) are zero. fp32 accumulation.

  Differentiable (custom VJP from the same kernels). Tiles default per backend (DEFAULT_TILES);
  `interpret=None`: interpret on CPU. Raises NotImplementedError for cases it doesn't handle (a shape with
  no legal tile, a backend foreign to the platform) so the dispatcher can fall through.
  """
  _check_groups(rhs.shape[0])
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if lhs.shape[0] == 0:
    return jnp.zeros((0, rhs.shape[2]), out_dtype)
  opts = (*resolve_backend(backend, interpret), tile_m, tile_k, tile_n)
  if not opts[1] and target_platform() == jax.default_backend():  # on a device: once per signature, check
    # that its compiler takes the kernels (not when lowering for another platform: nothing compiles here)
    _require_compiles(_gmm_fwd_and_bwd(opts, out_dtype), lhs, rhs, group_sizes)
  return _gmm(lhs, rhs, group_sizes, opts, out_dtype)


def tgmm_pallas(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *, tile_m: int | None = None,
                tile_k: int | None = None, tile_n: int | None = None, backend: str | None = None,
                interpret: bool | None = None, preferred_element_type=None) -> jax.Array:
  """out[g] = lhs_gᵀ grad_g over group g's rows -> [G,k,n] (gmm's weight gradient); empty groups are zero."""
  _check_groups(group_sizes.shape[0])
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if lhs.shape[0] == 0:
    return jnp.zeros((group_sizes.shape[0], lhs.shape[1], grad.shape[1]), out_dtype)
  backend, interpret = resolve_backend(backend, interpret)
  opts = (backend, interpret, tile_m, tile_k, tile_n)
  if not interpret and target_platform() == jax.default_backend():
    probe = _Probe("tgmm", lambda x, d, gs: _tgmm_call(x, d, gs, opts, out_dtype), opts, out_dtype)
    _require_compiles(probe, lhs, grad, group_sizes)
  return _tgmm_call(lhs, grad, group_sizes, opts, out_dtype)
