"""Training-state memory per device: the estimate from shapes equals the bytes of real sharded arrays."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phds_jax import sharding
from phds_jax.models import config as config_lib
from phds_jax.training import memory


def _device0_bytes(tree) -> int:
  """Bytes that device 0 actually holds for a pytree of sharded arrays."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


CFG = config_lib.tiny("qwen2_moe", num_experts=6, k_pre=2, dtype="bfloat16", param_dtype="float32")


@functools.cache
def _params():
  """Zeros in the real tree's shapes and dtypes (values don't matter for bytes; skips compiling init)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), memory.param_shapes(CFG))


# 6 experts: an expert axis of 4 does not divide them (replicated on it, as in training), 2 does.
@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "expert": 4}, {"fsdp": 4, "expert": 2}])
def test_estimate_equals_sharded_arrays(mesh_shape):
  cfg, params = CFG, _params()
  mesh = sharding.make_mesh(mesh_shape)
  sharded = jax.device_put(params, sharding.param_shardings(params, mesh))
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.device_put(opt_state, sharding.param_shardings(opt_state, mesh))  # as the trainer shards it
  moments = [s for s in jax.tree.leaves(opt_state) if s.ndim > 0]  # mu and nu (the step count is a scalar)

  est = memory.state_bytes_per_device(cfg, mesh_shape)
  assert est.params == _device0_bytes(sharded)
  assert est.grads == est.params  # fp32 gradients of fp32 master weights
  assert est.optimizer == sum(_device0_bytes(m) for m in moments)
  assert est.num_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert "float32 master" in est.render() and "bfloat16" in est.render()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params)), "master weights stay fp32"


def test_sharding_divides_and_errors():
  cfg = config_lib.tiny("olmoe")
  one = memory.state_bytes_per_device(cfg)
  fsdp = memory.state_bytes_per_device(cfg, {"fsdp": 4})
  assert fsdp.params < one.params and one.optimizer == 2 * one.params
  assert memory.state_bytes_per_device(cfg, optimizer="sgd").optimizer == 0
  with pytest.raises(ValueError, match="mesh axes"):
    memory.state_bytes_per_device(cfg, {"model": 2})
  with pytest.raises(ValueError, match="optimizer"):
    memory.state_bytes_per_device(cfg, optimizer="adafactor")
