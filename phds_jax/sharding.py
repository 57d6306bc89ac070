"""Device mesh and sharding rules (data, fsdp and expert axes), validated before anything compiles.

This module owns the mesh axis names: the models' shard_map (models/expert_parallel.py), the trainer and the
memory planner all read them from here.

Parameters are sharded by regex rules over their '/'-joined path; the first matching rule wins. A rule names a
mesh axis per dimension; an axis that does not divide its dimension is dropped for that parameter (logged),
so the same rules serve Qwen's 60 experts and OLMoE's 64. The batch is split over every mesh axis.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "expert")
BATCH_AXES: tuple[str, ...] = MESH_AXES  # every mesh axis shards the batch
EXPERT_AXIS = "expert"  # experts are split over this axis (all_to_all in models/expert_parallel.py)

# (regex over the parameter path, one mesh axis or None per dimension)
DEFAULT_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r".*/moe/wi$", ("expert", "fsdp", None)),
    (r".*/moe/wo$", ("expert", None, "fsdp")),
    (r".*/moe/router/kernel$", (None, None)),
    (r"(^|.*/)embed/embedding$", ("fsdp", None)),
    (r".*/kernel$", ("fsdp", None)),
    (r".*/(wi|wo)$", ("fsdp", None)),
)


class MeshError(ValueError):
  """A mesh shape that does not fit the devices or the model."""


def mesh_sizes(shape: dict[str, int] | Sequence[int], num_devices: int) -> dict[str, int]:
  """Axis sizes of a mesh shape for `num_devices` devices, with a -1 axis taking the remaining devices.

  The one completion rule: config checks, the dry-run plan and `make_mesh` all call it.
  """
  if isinstance(shape, dict):
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise MeshError(f"mesh axes {unknown} are not among {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise MeshError(f"mesh shape {sizes} must give a size for each of {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise MeshError(f"mesh shape {sizes}: at most one axis may be -1")
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if rest < 1 or num_devices % rest:
      raise MeshError(f"mesh shape {dict(zip(MESH_AXES, sizes))} cannot be completed for {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // rest
  if any(s < 1 for s in sizes) or int(np.prod(sizes)) != num_devices:
    raise MeshError(f"mesh shape {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices, "
                    f"but {num_devices} are available")
  return dict(zip(MESH_AXES, sizes))


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over ('data', 'fsdp', 'expert'); -1 in one axis takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = list(mesh_sizes(shape, len(devices)).values())
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def validate_mesh_for_model(mesh: Mesh | dict[str, int], num_experts: int) -> None:
  """The expert axis must divide the experts (a Mesh, or a dict of axis sizes from `mesh_sizes`)."""
  shape = mesh if isinstance(mesh, dict) else mesh.shape
  if num_experts % shape["expert"]:
    raise MeshError(f"expert axis of size {shape['expert']} does not divide num_experts={num_experts}; "
                    f"use a divisor (e.g. {[d for d in range(1, num_experts + 1) if num_experts % d == 0]})")


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The axes of `mesh` the batch is split over (every batch axis it has)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch is split into: the product of the batch axes' sizes."""
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def path_str(path) -> str:
  """A pytree key path as the '/'-joined string the sharding rules match."""
  return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """PartitionSpec of one parameter by the first matching rule (replicated if none)."""
  for pattern, axes in rules:
    if re.match(pattern, path) and len(axes) == len(shape):
      kept = []
      for dim, axis in zip(shape, axes):
        if axis is not None and mesh.shape[axis] > 1 and dim % mesh.shape[axis]:
          logging.info("%s: dim %d not divisible by mesh axis %s=%d; replicated on it", path, dim, axis,
                       mesh.shape[axis])
          axis = None
        kept.append(axis if axis is None or mesh.shape[axis] > 1 else None)
      return P(*kept)
  return P()


def param_shardings(params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs: parameters, or a whole train state, whose
  optimizer moments sit under paths ending like the parameter they mirror (so they shard the same way)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_str(path), tuple(x.shape), mesh, rules)), params)


def batch_sharding(mesh: Mesh, leading_unsharded: int = 0) -> NamedSharding:
  """Sharding of a batch array [*leading, B, ...] with B split over every mesh axis."""
  return NamedSharding(mesh, P(*([None] * leading_unsharded), MESH_AXES))
