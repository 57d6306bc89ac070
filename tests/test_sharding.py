"""Sharded execution on 8 fake CPU devices equals one device: expert parallelism (all_to_all), data, fsdp."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phds_jax import models, sharding
from phds_jax.training import step as step_lib


def _batch(cfg, m, b, t, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, cfg.vocab_size, (m, b, t + 1))
  seg = np.ones((m, b, t), np.int32)
  seg[:, :, t // 2:] = 2  # two packed examples per row
  pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
  return dict(tokens=jnp.asarray(tok[..., :-1], jnp.int32), targets=jnp.asarray(tok[..., 1:], jnp.int32),
              loss_mask=jnp.ones((m, b, t), jnp.float32), segment_ids=jnp.asarray(seg),
              positions=jnp.asarray(np.broadcast_to(pos, (m, b, t)), jnp.int32))


def test_mesh_validation():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(dict(data=-1, expert=2))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2}
  with pytest.raises(sharding.MeshError, match="available"):
    sharding.make_mesh(dict(data=3))
  with pytest.raises(sharding.MeshError, match="at most one"):
    sharding.make_mesh(dict(data=-1, fsdp=-1))
  with pytest.raises(sharding.MeshError, match="divide num_experts"):
    sharding.validate_mesh_for_model(sharding.make_mesh(dict(data=1, expert=8)), num_experts=60)
  sharding.validate_mesh_for_model(sharding.make_mesh(dict(data=2, expert=4)), num_experts=60)


def test_sharding_rules_drop_non_dividing_axes():
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, expert=4))
  assert sharding.spec_for("layer_0/moe/wi", (60, 64, 32), mesh) == jax.sharding.PartitionSpec("expert", "fsdp", None)
  assert sharding.spec_for("layer_0/moe/wi", (6, 64, 32), mesh) == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert sharding.spec_for("final_norm/scale", (64,), mesh) == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("family, mesh_shape", [
    ("olmoe", dict(data=2, expert=4)),
    ("qwen2_moe", dict(data=4, expert=2)),
])
def test_expert_parallel_forward_and_grads_equal_single_device(family, mesh_shape):
  cfg = models.tiny(family)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 12), 0, cfg.vocab_size)
  model = models.build(cfg)

  def loss(p, k):
    logits, aux = model.apply({"params": p}, tokens, k=k, mode="soft")
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["lb_loss"], logits

  ref = {k: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, k) for k in (1, 3)}
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, sharding.param_shardings(params, mesh))
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    for k in (1, 3):
      (l, logits), g = fn(sharded, k)
      (l_ref, logits_ref), g_ref = ref[k]
      np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
      chex.assert_trees_all_close(jax.device_get(g), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [dict(data=4, expert=2), dict(data=2, fsdp=4)])
def test_sharded_training_matches_one_device(mesh_shape):
  cfg = models.tiny("olmoe")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tx = optax.adamw(3e-3)
  levels = (2, 3, 4)
  step_fn = step_lib.make_train_step(cfg, levels, tx)
  batches = [_batch(cfg, 2, 8, 16, seed=s) for s in range(3)]
  idx = [jnp.asarray([s % 3, (s + 1) % 3], jnp.int32) for s in range(3)]

  def run(state, fn, put=lambda b: b):
    losses = []
    for b, i in zip(batches, idx):
      state, m = fn(state, put(b), i)
      losses.append(float(m["loss"]))
    return losses

  ref = run(step_lib.init_state(params, tx), jax.jit(step_fn))
  mesh = sharding.make_mesh(mesh_shape)
  with jax.set_mesh(mesh):
    state, shardings = step_lib.sharded_init_state(params, tx, mesh)
    assert state.opt_state[0].mu["layer_0"]["moe"]["wi"].sharding.spec == shardings.params["layer_0"]["moe"]["wi"].spec
    bs = sharding.batch_sharding(mesh, leading_unsharded=1)
    fn = jax.jit(step_fn, in_shardings=(shardings, bs, None), out_shardings=(shardings, None))
    losses = run(state, fn, put=lambda b: jax.device_put(b, bs))
  np.testing.assert_allclose(losses, ref, rtol=2e-5)
  assert ref[-1] < ref[0]


def test_expert_parallel_with_pallas_kernels_equals_single_device():
  """The Pallas grouped matmul, router and permutation kernels (interpreted here) inside shard_map with
  all_to_all expert parallelism give the single-device ragged_dot + jnp results, forward and gradients."""
  ref_cfg = models.tiny("olmoe", gmm_impl="ragged_dot")
  cfg = ref_cfg.replace(gmm_impl="pallas", routing_impl="pallas")
  params = models.init_params(ref_cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 8), 0, cfg.vocab_size)

  def loss_of(c):
    def loss(p):
      logits, aux = models.build(c).apply({"params": p}, tokens, k=2, mode="soft")
      return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["lb_loss"], logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))

  (_, logits_ref), g_ref = loss_of(ref_cfg)(params)
  mesh = sharding.make_mesh(dict(data=2, expert=4))
  with jax.set_mesh(mesh):
    (_, logits), g = loss_of(cfg)(jax.device_put(params, sharding.param_shardings(params, mesh)))
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.device_get(g), g_ref, rtol=1e-4, atol=1e-6)
