"""Power-of-two padding: the one rounding rule behind every padded length, batch and kernel tile.

Padding a variable size up to a power of two bounds how many shapes reach `jax.jit` (a compilation each)
to log2 of the range, and Triton tensors must have power-of-two shapes anyway.
"""

from __future__ import annotations


def next_pow2(n: int) -> int:
  """Smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(int(n) - 1, 0).bit_length()


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
  """The padded size of n: the next power of two, at least `minimum`, capped at `maximum` (n must fit it)."""
  if maximum is not None and n > maximum:
    raise ValueError(f"size {n} exceeds the maximum {maximum}")
  size = max(minimum, next_pow2(n))
  return size if maximum is None else min(size, maximum)
