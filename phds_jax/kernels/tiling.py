"""Tile sizes for the Pallas kernels, shared by every family (grouped matmul, permutation, router).

Triton tensors must have power-of-two shapes, so a tile along a dimension the kernel does not pad must be a
power of two that divides it (`pow2_tile`), and a tile along padded rows may be any power of two
(`row_tile`). `next_pow2` is the package's one rounding rule (phds_jax/shapes.py). `dot_precision` is how
a tile's dot product is computed, the same for Triton and Mosaic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from phds_jax.shapes import next_pow2

__all__ = ["dot_precision", "next_pow2", "pow2_tile", "row_tile"]


def pow2_tile(dim: int, preferred: int, name: str, minimum: int = 1) -> int:
  """Largest power of two <= `preferred` dividing `dim`; NotImplementedError (so the dispatcher falls
  through) when it would be below `minimum`."""
  tile = 1 << max(int(preferred), 1).bit_length() - 1
  while tile > 1 and dim % tile:
    tile //= 2
  if tile < minimum:
    raise NotImplementedError(f"pallas gmm (triton): {name}={dim} has no power-of-two tile >= {minimum} "
                              f"dividing it (preferred tile {preferred})")
  return tile


def row_tile(m: int, preferred: int, minimum: int) -> int:
  """Row tile: rows are padded, so any power of two works; no bigger than m needs, no smaller than minimum."""
  return max(minimum, min(1 << max(int(preferred), 1).bit_length() - 1, next_pow2(m)))


def dot_precision(dtype) -> lax.Precision | None:
  """fp32 tiles follow jax's default matmul precision ("float32"/"highest" -> exact fp32; otherwise the
  platform's fast default, as XLA's own fp32 dots: TF32 on GPUs, bf16 passes on TPUs); other dtypes need
  none."""
  if jnp.dtype(dtype) != jnp.float32:
    return None
  setting = str(jax.config.jax_default_matmul_precision or "").lower()
  return lax.Precision.HIGHEST if setting in ("float32", "highest") else None
