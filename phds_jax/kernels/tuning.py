"""Which grouped-matmul implementation `impl="auto"` tries first, per device kind: a small tuned table.

Like tokamax's autotuning data, the choice is data, not code: each entry names a device kind (as
`jax.Device.device_kind` spells it, matched exactly, else by prefix, else the platform's default) and the
order to try. Every order ends in an implementation that always runs, and each earlier one may raise
NotImplementedError (not installed, a shape it declines, a compiler that rejects it) so the next is tried.
`SOURCE` records why each order is what it is; a row should change only with a benchmark run
(`python benchmarks/gmm.py --sweep olmoe`) on that device, recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import jax

from phds_jax.kernels.platform import target_platform

__all__ = ["AUTO_ORDERS", "CPU_SMALL_ORDER", "SMALL_PROBLEM_MACS", "SOURCE", "auto_order", "device_kind"]

# Device kind (or platform name as the default for its platform) -> order for impl="auto".
AUTO_ORDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("jax", "ragged_dot"),
    "gpu": ("pallas", "tokamax", "ragged_dot", "jax"),
    "tpu": ("pallas", "tokamax", "ragged_dot", "jax"),
    # Hopper: tokamax's Mosaic GPU kernel (wgmma, TMA) is built for sm90; ours is Triton (deprecated there).
    "NVIDIA H100": ("tokamax", "pallas", "ragged_dot", "jax"),
    "NVIDIA H200": ("tokamax", "pallas", "ragged_dot", "jax"),
    "NVIDIA H20": ("tokamax", "pallas", "ragged_dot", "jax"),
}
# CPU, tiny problems (G·m·k·n <= SMALL_PROBLEM_MACS): ragged_dot's dense expansion runs within ~0.3 ms of the
# tiled loops and compiles ~5x faster, which is what the CPU test suite's small models pay for.
CPU_SMALL_ORDER: tuple[str, ...] = ("ragged_dot", "jax")
SMALL_PROBLEM_MACS = 1 << 24

SOURCE: dict[str, str] = {
    "cpu": "measured, 2-core x86 (docs/benchmarks.md: tiled loops 6-116x ragged_dot's dense expansion)",
    "gpu": "measured on H200 for pallas vs ragged_dot (10x fwd, 30x fwd+bwd at 16k tokens); tokamax unmeasured",
    "tpu": "unmeasured: pallas (Mosaic TPU) first as on GPU",
    "NVIDIA H100": "tokamax first: unmeasured here (pending GPU run); pallas 10x ragged_dot measured on H200",
    "NVIDIA H200": "tokamax first: unmeasured here (pending GPU run); pallas 10x ragged_dot measured on H200",
    "NVIDIA H20": "tokamax first: unmeasured here (pending GPU run)",
}


def device_kind(platform: str | None = None) -> str:
  """The local device's kind when kernels are chosen for the local backend, else the platform's name
  (lowering ahead of time for another platform has no device to ask)."""
  platform = platform or target_platform()
  if platform == jax.default_backend():
    devices = jax.local_devices()
    if devices:
      return devices[0].device_kind
  return platform


def auto_order(platform: str | None = None, kind: str | None = None, dense_macs: int | None = None,
               table: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
  """The order for impl="auto": the exact kind's row, else the longest row that prefixes it, else the
  platform's row. `dense_macs` (G·m·k·n) picks CPU_SMALL_ORDER for tiny CPU problems."""
  table = AUTO_ORDERS if table is None else table
  platform = platform or target_platform()
  if platform == "cpu" and dense_macs is not None and dense_macs <= SMALL_PROBLEM_MACS:
    return CPU_SMALL_ORDER
  kind = device_kind(platform) if kind is None else kind
  if kind in table:
    return table[kind]
  prefixes = [k for k in table if k not in ("cpu", "gpu", "tpu") and kind.startswith(k)]
  if prefixes:
    return table[max(prefixes, key=len)]
  return table.get(platform, table["gpu"] if platform != "cpu" else table["cpu"])
