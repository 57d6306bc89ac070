"""Training-state memory per device under the mixed precision the field uses, from shapes alone.

Mixed precision as in Megatron / MaxText: fp32 master weights (`param_dtype`), bf16 compute (`dtype`: each
layer casts its weights at use, inside the jitted step, so the bf16 copies are transient activations, not
state), fp32 gradients (the gradient of an fp32 parameter) and fp32 AdamW moments (optax keeps mu/nu in the
parameters' dtype). Per device, every tensor counts its shard under the trainer's sharding rules
(`sharding.spec_for`): an axis shards a dimension only where it divides it, as in training.

    est = memory.state_bytes_per_device(cfg, {"data": 1, "fsdp": 8, "expert": 1})
    print(est.render())          # params 1.6 GiB + grads 1.6 GiB + AdamW 3.3 GiB = 6.5 GiB per device

Not counted: activations and XLA scratch (they scale with tokens per device and rematerialisation).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import jax
import jax.numpy as jnp

from phds_jax import models, sharding
from phds_jax.models.config import ModelConfig

__all__ = ["MemoryEstimate", "param_shapes", "shard_bytes", "state_bytes_per_device"]

OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 0, "momentum": 1, "lion": 1}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of the training state; `mesh` as given, `num_params` global."""

  mesh: dict[str, int]
  num_params: int
  params: int  # master weights, param_dtype
  grads: int
  optimizer: int
  compute_dtype: str
  master_dtype: str

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer

  def render(self) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"  # noqa: E731
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    return (f"{self.num_params / 1e6:.1f}M params, mesh {mesh}: per device params {gib(self.params)} "
            f"({self.master_dtype} master) + grads {gib(self.grads)} + optimizer {gib(self.optimizer)} = "
            f"{gib(self.total)}; compute in {self.compute_dtype} (activations not included)")


def param_shapes(cfg: ModelConfig) -> Any:
  """The parameter tree as ShapeDtypeStructs (traced abstractly: no memory, no device)."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda t: models.build(cfg).init(jax.random.PRNGKey(0), t)["params"], tokens)


def shard_bytes(shapes: Any, mesh_sizes: dict[str, int], dtype=None) -> int:
  """Bytes of one device's shard of every leaf (in `dtype`, else each leaf's own), by the training rules."""
  mesh = types.SimpleNamespace(shape={a: int(mesh_sizes.get(a, 1)) for a in sharding.MESH_AXES})
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    spec = sharding.spec_for(sharding.path_str(path), tuple(leaf.shape), mesh)  # the rules training uses
    elems = 1
    for i, dim in enumerate(leaf.shape):
      axis = spec[i] if i < len(spec) else None
      elems *= math.ceil(dim / (mesh.shape[axis] if axis else 1))
    total += elems * jnp.dtype(dtype or leaf.dtype).itemsize
  return total


def state_bytes_per_device(cfg: ModelConfig, mesh_sizes: dict[str, int] | None = None, *,
                           optimizer: str = "adamw", grad_dtype=None, moment_dtype=None) -> MemoryEstimate:
  """Master weights + gradients + optimizer moments per device. Gradients and moments default to the master
  weights' dtype (cfg.param_dtype), which is what jax.grad and optax give."""
  if optimizer not in OPTIMIZER_MOMENTS:
    raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZER_MOMENTS)}")
  mesh_sizes = dict(mesh_sizes or {})
  unknown = set(mesh_sizes) - set(sharding.MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {sharding.MESH_AXES}")
  shapes = param_shapes(cfg)
  params = shard_bytes(shapes, mesh_sizes)
  grads = shard_bytes(shapes, mesh_sizes, grad_dtype)
  moments = OPTIMIZER_MOMENTS[optimizer] * shard_bytes(shapes, mesh_sizes, moment_dtype)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  return MemoryEstimate(mesh={a: int(mesh_sizes.get(a, 1)) for a in sharding.MESH_AXES}, num_params=num_params,
                        params=params, grads=grads, optimizer=moments, compute_dtype=cfg.dtype,
                        master_dtype=cfg.param_dtype)
