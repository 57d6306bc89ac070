"""Device mesh and sharding rules (data, fsdp and expert axes), validated before anything compiles.

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

from phds_jax.models.expert_parallel import BATCH_AXES

MESH_AXES: tuple[str, ...] = BATCH_AXES  # ("data", "fsdp", "expert")

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


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over ('data', 'fsdp', 'expert'); -1 in one axis takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES] if isinstance(shape, dict) else [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise MeshError(f"mesh shape {sizes} must give a size for each of {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise MeshError(f"mesh shape {sizes}: at most one axis may be -1")
  if -1 in sizes:
    rest = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % rest:
      raise MeshError(f"mesh shape {sizes} cannot be completed for {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // rest
  if any(s < 1 for s in sizes) or int(np.prod(sizes)) != len(devices):
    raise MeshError(f"mesh shape {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices, "
                    f"but {len(devices)} are available")
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def validate_mesh_for_model(mesh: Mesh, num_experts: int) -> None:
  if num_experts % mesh.shape["expert"]:
    raise MeshError(f"expert axis of size {mesh.shape['expert']} does not divide num_experts={num_experts}; "
                    f"use a divisor (e.g. {[d for d in range(1, num_experts + 1) if num_experts % d == 0]})")


def batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in MESH_AXES]))


def _path(path) -> str:
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
      lambda path, x: NamedSharding(mesh, spec_for(_path(path), tuple(x.shape), mesh, rules)), params)


def batch_sharding(mesh: Mesh, leading_unsharded: int = 0) -> NamedSharding:
  """Sharding of a batch array [*leading, B, ...] with B split over every mesh axis."""
  return NamedSharding(mesh, P(*([None] * leading_unsharded), MESH_AXES))
