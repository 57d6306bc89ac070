"""Shared benchmark helpers: the machine and library versions, median timing, and columns that survive failure.

A benchmark line compares implementations side by side; one that fails (out of memory, a compiler error, a
kernel that declines the shape, a package that is not installed) must not take the line with it. `attempt`
runs one column and returns either its value or an `NA` carrying a short reason; `cell` prints either.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import platform
import sys
from typing import Any, Callable

import jax

from phds_jax import timing

median_ms = timing.median_ms  # the benchmarks time with the package's one timer


@dataclasses.dataclass(frozen=True)
class NA:
  """A column that did not run: `tag` is what the table shows, `detail` the first line of the error."""

  tag: str
  detail: str

  def __str__(self) -> str:
    return f"n/a ({self.tag})"


def classify(error: BaseException) -> NA:
  """Short tag for the table: OOM, missing package, not implemented, compile error, or the error's type."""
  text = f"{type(error).__name__}: {error}"
  first = text.strip().splitlines()[0][:240] if text.strip() else type(error).__name__
  low = text.lower()
  if "resource_exhausted" in low or "out of memory" in low or isinstance(error, MemoryError):
    return NA("OOM", first)
  if isinstance(error, ImportError):
    return NA("missing", first)
  if isinstance(error, NotImplementedError):
    return NA("not impl", first)
  if "compil" in low or "lowering" in low or "mosaic" in low or "triton" in low:
    return NA("compile", first)
  return NA(type(error).__name__, first)


def attempt(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """fn(*args, **kwargs), or an NA naming why it failed (any Exception: a column never ends the run)."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # noqa: BLE001 - report, don't crash: the rest of the line must stand
    return classify(e)


def ok(*values: Any) -> bool:
  """True when none of the values is an NA."""
  return not any(isinstance(v, NA) for v in values)


def cell(value: Any, width: int = 10, fmt: str = ".2f") -> str:
  """A right-aligned table cell: the number formatted, or 'n/a (reason)' (a string is shown as it is)."""
  text = str(value) if isinstance(value, (NA, str)) else format(value, fmt)
  return f"{text:>{width}}"


def ratio(a: Any, b: Any) -> float | NA:
  """a / b, or an NA when either side did not run."""
  if not ok(a, b):
    return next(v for v in (a, b) if isinstance(v, NA))
  return a / b


_REPORTED: set[str] = set()


def failures(values: dict[str, Any]) -> list[str]:
  """'name: detail' for every NA in a row not reported before in this run, to print under the table (the
  cell only has room for the tag; a reason repeated on every line would bury the numbers)."""
  out = []
  for name, v in values.items():
    if isinstance(v, NA) and v.tag != "skipped" and v.detail not in _REPORTED:
      _REPORTED.add(v.detail)
      out.append(f"{name}: {v.detail}")
  return out


def version(module: str) -> str:
  """The module's __version__, or why it does not import."""
  try:
    return getattr(importlib.import_module(module), "__version__", "?")
  except Exception as e:  # noqa: BLE001
    return f"n/a ({type(e).__name__})"


def device_kind() -> str:
  devices = jax.devices()
  return devices[0].device_kind if devices else "?"


def machine(*extra_modules: str) -> str:
  """One line naming the machine, the device kind, and the versions of jax and any `extra_modules`."""
  devices = jax.devices()
  cpu = platform.processor() or platform.machine()
  line = (f"{platform.node()} | {cpu} | {os.cpu_count()} CPU cores | python {sys.version.split()[0]} | "
          f"jax {jax.__version__} | backend {jax.default_backend()} ({device_kind()} x{len(devices)})")
  return line + "".join(f" | {m} {version(m)}" for m in extra_modules)
