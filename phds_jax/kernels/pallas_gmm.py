"""Pallas grouped matmul (`gmm_pallas`) and its weight-gradient twin (`tgmm_pallas`), with a custom VJP.

Two kernel families share this entry point, because GPUs and TPUs disagree on how a grid runs:
  "triton"      (pallas_gmm_triton.py) GPUs: programs run concurrently, so each owns its output block and
                loops over groups / k / rows inside the kernel;
  "mosaic_tpu"  (pallas_gmm_tpu.py) TPUs: the grid is a sequential loop, so items sharing an output block
                accumulate into it on consecutive steps and Mosaic pipelines the block DMAs.
`backend=None` picks from the target platform (kernels/platform.py); on CPU both run under the Pallas interpreter ("triton"
by default). The backward pass is the same for both, the shared grouped-matmul rule (gmm_vjp.py):
d lhs = gmm(g, rhs[g]ᵀ) without a transposed copy of the weights (`transpose_rhs`), d rhs = tgmm(lhs, g).

On a device, the first call for each operand signature compiles the kernels (forward and both backward
kernels) on their own before they are used (probes.py, cached). A kernel that the device's
compiler rejects (Triton -> PTX, Mosaic -> TPU run only there) then raises NotImplementedError with the
compiler's message, so `kernels.gmm(impl="auto")` falls through to ragged_dot with a warning instead of
failing inside the caller's jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from phds_jax.kernels.gmm_vjp import differentiable_gmm
from phds_jax.kernels.pallas_gmm_tpu import gmm_mosaic, tgmm_mosaic
from phds_jax.kernels.pallas_gmm_triton import gmm_triton, tgmm_triton
from phds_jax.kernels.platform import pallas_family, target_platform
from phds_jax.kernels.probes import Probe, forward_and_backward, require_compiles

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
  if transpose_rhs:  # d lhs contracts over n: the forward's tile_n is the contraction tile, tile_k the output's
    tile_k, tile_n = tile_n, tile_k
  kernel = _KERNELS[backend][0]
  return kernel(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, interpret=interpret, out_dtype=out_dtype,
                **_tiles(backend, "gmm", tile_m, tile_k, tile_n))


def _tgmm_call(lhs, grad, group_sizes, opts, out_dtype):
  backend, interpret, tile_m, tile_k, tile_n = opts
  kernel = _KERNELS[backend][1]
  return kernel(lhs, grad, group_sizes, interpret=interpret, out_dtype=out_dtype,
                **_tiles(backend, "tgmm", tile_m, tile_k, tile_n))


_gmm = differentiable_gmm(_gmm_call, _tgmm_call)  # (lhs, rhs, group_sizes, opts, out_dtype)


def _gmm_fwd_and_bwd(opts, out_dtype) -> Probe:
  """The forward and both backward kernels (gmm with rhsᵀ, tgmm), as one function to compile."""
  fn = forward_and_backward(lambda x, w, gs: _gmm(x, w, gs, opts, out_dtype))
  return Probe(("gmm", opts, jnp.dtype(out_dtype).name), fn)


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
    require_compiles(_gmm_fwd_and_bwd(opts, out_dtype), lhs, rhs, group_sizes,
                     failure="pallas gmm kernels do not compile here")
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
    probe = Probe(("tgmm", opts, out_dtype.name), lambda x, d, gs: _tgmm_call(x, d, gs, opts, out_dtype))
    require_compiles(probe, lhs, grad, group_sizes, failure="pallas tgmm kernels do not compile here")
  return _tgmm_call(lhs, grad, group_sizes, opts, out_dtype)
