"""Shared benchmark helpers: the machine description, and median timing (from phds_jax.timing)."""

from __future__ import annotations

import os
import platform

import jax

from phds_jax.timing import median_ms  # noqa: F401  (re-exported for the benchmarks)


def machine() -> str:
  """One line naming the machine, for docs/benchmarks.md."""
  devices = jax.devices()
  kind = devices[0].device_kind if devices else "?"
  cpu = platform.processor() or platform.machine()
  return (f"{platform.node()} | {cpu} | {os.cpu_count()} CPU cores | jax {jax.__version__} | "
          f"backend {jax.default_backend()} ({kind} x{len(devices)})")
