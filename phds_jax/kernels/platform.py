"""The platform the kernels are chosen and lowered for: the default backend, or a target named for lowering
ahead of time on another machine (e.g. exporting a GPU program from a CPU host, which is how the tests check
the GPU and TPU kernel lowerings of the whole model).

    with kernels.lowering_for("gpu"):
      jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)

Inside the context `kernels.gmm(impl="auto")` picks the GPU order, Pallas kernels lower non-interpreted for
that target, and nothing is compiled on this machine for it. Not thread-safe: one lowering at a time.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

PLATFORMS: tuple[str, ...] = ("cpu", "gpu", "tpu")
_TARGETS: list[str] = []

__all__ = ["PLATFORMS", "lowering_for", "pallas_family", "target_platform"]


def target_platform() -> str:
  """'cpu' | 'gpu' | 'tpu': the innermost `lowering_for` target, else jax.default_backend()."""
  return _TARGETS[-1] if _TARGETS else jax.default_backend()


def pallas_family(platform: str | None = None) -> str:
  """The Pallas kernel family for a platform: Mosaic on TPU, Triton on GPU (and the CPU interpreter)."""
  return "mosaic_tpu" if (platform or target_platform()) == "tpu" else "triton"


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
  """Choose and lower kernels for `platform` instead of the local backend (ahead-of-time export)."""
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; valid: {', '.join(PLATFORMS)}")
  _TARGETS.append(platform)
  try:
    yield
  finally:
    _TARGETS.pop()
