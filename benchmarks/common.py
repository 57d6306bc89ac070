"""Shared benchmark helpers: machine description and median timing of jitted calls."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import jax
import numpy as np


def machine() -> str:
  """One line naming the machine, for docs/benchmarks.md."""
  devices = jax.devices()
  kind = devices[0].device_kind if devices else "?"
  cpu = platform.processor() or platform.machine()
  return (f"{platform.node()} | {cpu} | {os.cpu_count()} CPU cores | jax {jax.__version__} | "
          f"backend {jax.default_backend()} ({kind} x{len(devices)})")


def median_ms(fn: Callable, *args, repeats: int = 7, warmup: int = 2, **kwargs) -> float:
  """Median wall time in milliseconds; warm-up calls absorb compilation."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args, **kwargs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))
