"""Wall-clock timing of jitted calls (dial_k.py and the benchmarks share it)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np


def median_ms(fn: Callable, *args, repeats: int = 7, warmup: int = 2, **kwargs) -> float:
  """Median wall time in milliseconds of `fn(*args, **kwargs)`; warm-up calls absorb compilation."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args, **kwargs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))
