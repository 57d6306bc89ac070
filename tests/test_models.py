"""Model-level tests that need no reference framework: routing semantics, static-k compilation, MoE paths."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import models
from phds_jax.models import experts as experts_lib
from phds_jax.models import moe as moe_lib
from phds_jax.models import router as router_lib

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe")


def _tokens(cfg, b=2, t=12, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, cfg.vocab_size)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
  cfg = models.tiny(request.param)
  return cfg, models.init_params(cfg, jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------------ router


def _np_route(logits, k, k_pre, mode, eps, norm):
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  slots = k if mode == "hard" else max(k, k_pre)
  order = np.argsort(-probs, axis=-1, kind="stable")[:, :slots]
  w = np.take_along_axis(probs, order, -1)
  w[:, k:] = eps
  if norm:
    w /= w.sum(-1, keepdims=True)
  return w, order, probs


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_route_matches_numpy(mode, norm, k):
  num_tokens, num_experts, k_pre = 32, 8, 4
  logits = np.random.default_rng(k).normal(size=(num_tokens, num_experts)).astype(np.float32) * 3
  mask = np.ones(num_tokens, np.float32)
  mask[-5:] = 0
  r = router_lib.route(jnp.asarray(logits), k=k, k_pre=k_pre, mode=mode, eps=1e-3, norm_topk_prob=norm,
                       token_mask_T=jnp.asarray(mask))
  w, order, probs = _np_route(logits, k, k_pre, mode, 1e-3, norm)
  slots = w.shape[1]
  chex.assert_shape([r.weights_TxS, r.experts_TxS], (num_tokens, slots))
  chex.assert_type(r.experts_TxS, jnp.int32)
  np.testing.assert_array_equal(np.asarray(r.experts_TxS), order)
  np.testing.assert_allclose(np.asarray(r.weights_TxS), w, rtol=1e-6, atol=1e-7)
  # Hand-computed aux statistics over the 27 real tokens.
  real = mask > 0
  load = np.zeros(num_experts)
  for t in np.nonzero(real)[0]:
    for e in order[t, :k]:
      load[e] += 1
  n = real.sum()
  lb = num_experts * np.sum(load / n * probs[real].mean(0)) / k
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(np.asarray(r.expert_load_E), load)
  np.testing.assert_allclose(float(r.lb_loss), lb, rtol=1e-5)
  np.testing.assert_allclose(float(r.z_loss), np.mean(lse[real] ** 2), rtol=1e-5)


def test_lb_loss_scale_does_not_move_with_k():
  """Uniform router: the balance loss is 1 at every k (normalised by k)."""
  logits = jnp.zeros((64, 8))
  for k in range(1, 9):
    r = router_lib.route(logits + 1e-3 * jnp.arange(64 * 8).reshape(64, 8) % 8, k=k, k_pre=4)
    assert 0.9 < float(r.lb_loss) < 1.1, (k, float(r.lb_loss))


def test_check_k_errors_and_warning(caplog):
  with pytest.raises(ValueError, match="out of range"):
    router_lib.check_k(0, 8, 4)
  with pytest.raises(ValueError, match="out of range"):
    router_lib.check_k(9, 8, 4)
  with pytest.raises(TypeError, match="Python int"):
    router_lib.check_k(jnp.int32(2), 8, 4)
  with caplog.at_level(logging.WARNING):
    router_lib.check_k(6, 8, 4)
  assert "above the checkpoint's k_pre" in caplog.text
  with pytest.raises(ValueError, match="router mode"):
    router_lib.num_slots(2, 4, "sparse")


def test_model_rejects_bad_k(family):
  cfg, params = family
  with pytest.raises(ValueError, match="out of range"):
    models.build(cfg).apply({"params": params}, _tokens(cfg), k=cfg.num_experts + 1)


# ----------------------------------------------------------------------------------------------- MoE paths


@pytest.mark.parametrize("impl", ["jax", "pallas"])  # pallas: the Triton kernels under the CPU interpreter
def test_gather_vjps_match_autodiff(impl):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  experts = jnp.asarray(rng.integers(0, 4, size=(6, 3)), jnp.int32)
  order, inverse, sizes = experts_lib.sort_by_expert(experts, 4)
  np.testing.assert_array_equal(np.asarray(sizes), np.bincount(np.asarray(experts).ravel(), minlength=4))
  cot = jnp.asarray(rng.normal(size=(18, 16)), jnp.float32)
  f_custom = lambda x: jnp.sum(experts_lib.dispatch(x, order, inverse, 3, impl) * cot)
  f_plain = lambda x: jnp.sum(x[order // 3] * cot)
  np.testing.assert_allclose(f_custom(x), f_plain(x), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(f_custom)(x), jax.grad(f_plain)(x), rtol=1e-5, atol=1e-6)
  y = jnp.asarray(rng.normal(size=(18, 16)), jnp.float32)
  w = jnp.asarray(rng.random((6, 3)), jnp.float32)
  cot_t = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  c_custom = lambda y, w: jnp.sum(experts_lib.combine(y, order, inverse, w, jnp.float32, impl) * cot_t)
  c_plain = lambda y, w: jnp.sum(jnp.einsum("tsd,ts->td", y[inverse].reshape(6, 3, 16), w) * cot_t)
  np.testing.assert_allclose(c_custom(y, w), c_plain(y, w), rtol=1e-6)
  for got, want in zip(jax.grad(c_custom, (0, 1))(y, w), jax.grad(c_plain, (0, 1))(y, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_sparse_equals_dense_reference_with_grads(family, mode):
  cfg, params = family
  tokens = _tokens(cfg)
  sparse, dense = models.build(cfg), models.build(cfg.replace(moe_impl="dense"))

  def loss(model, p, k):
    logits, aux = model.apply({"params": p}, tokens, k=k, mode=mode)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux["lb_loss"]

  for k in (1, cfg.k_pre):
    (ls, gs), (ld, gd) = (jax.value_and_grad(loss, argnums=1)(m, params, k) for m in (sparse, dense))
    np.testing.assert_allclose(ls, ld, rtol=1e-5)
    chex.assert_trees_all_close(gs, gd, rtol=1e-4, atol=1e-6)


def test_soft_with_zero_eps_equals_hard(family):
  cfg, params = family
  tokens = _tokens(cfg)
  hard = models.build(cfg)
  soft = models.build(cfg.replace(router_eps=0.0))
  for k in range(1, cfg.k_pre + 1):
    lh, _ = hard.apply({"params": params}, tokens, k=k, mode="hard")
    ls, _ = soft.apply({"params": params}, tokens, k=k, mode="soft")
    np.testing.assert_allclose(lh, ls, rtol=1e-5, atol=1e-5)


def test_soft_eps_reaches_experts_ranked_past_k():
  """With ε > 0, experts ranked in (k, k_pre] get gradient; in hard mode (or ε = 0) exactly zero."""
  cfg = models.tiny("olmoe", num_experts=8, k_pre=4)
  block = moe_lib.MoeBlock(cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, cfg.hidden_size))  # one token
  params = block.init(jax.random.PRNGKey(1), x, k=4, mode="hard")["params"]
  logits = x[0] @ params["router"]["kernel"]
  ranked = np.argsort(-np.asarray(logits[0]), kind="stable")
  k = 1

  def expert_grad_norms(c, mode):
    grad = jax.grad(lambda p: jnp.sum(moe_lib.MoeBlock(c).apply({"params": p}, x, k=k, mode=mode)[0]))(params)
    return np.asarray(jnp.sqrt(jnp.sum(grad["wi"] ** 2, axis=(1, 2))))

  soft = expert_grad_norms(cfg, "soft")
  assert soft[ranked[0]] > 0
  assert np.all(soft[ranked[k:cfg.k_pre]] > 0), soft
  assert np.all(soft[ranked[cfg.k_pre:]] == 0), soft
  # ε scales those gradients: they are ~1e-6 of the active expert's.
  assert np.all(soft[ranked[k:cfg.k_pre]] < 1e-4 * soft[ranked[0]])
  for c, mode in ((cfg, "hard"), (cfg.replace(router_eps=0.0), "soft")):
    g = expert_grad_norms(c, mode)
    assert np.all(g[ranked[k:]] == 0), (mode, g)


# ------------------------------------------------------------------------------------------ static-k jit


def test_one_compilation_per_distinct_k(family):
  cfg, params = family
  traces = []
  model = models.build(cfg)

  def forward(p, tokens, *, k):
    traces.append(k)
    return model.apply({"params": p}, tokens, k=k)[0]

  fwd = jax.jit(forward, static_argnames=("k",))
  tokens = _tokens(cfg)
  for k in (1, 2, 1, 3, 2, 1, 3):
    fwd(p=params, tokens=tokens, k=k).block_until_ready()
  assert traces == [1, 2, 3]
  jf = models.jit_forward(cfg)
  for k in (2, 2, 4, 4, 2):
    jf(params, tokens, k=k)
  assert jf._cache_size() == 2


def test_logits_change_with_k_and_shapes(family):
  cfg, params = family
  tokens = _tokens(cfg)
  fwd = models.jit_forward(cfg)
  outs = [fwd(params, tokens, k=k)[0] for k in range(1, cfg.k_pre + 1)]
  for out in outs:
    chex.assert_shape(out, (2, 12, cfg.vocab_size))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
  assert float(jnp.abs(outs[0] - outs[-1]).max()) > 1e-4


def test_bf16_compute_runs_close_to_fp32(family):
  cfg, params = family
  tokens = _tokens(cfg)
  bf = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params_bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
  l32, _ = models.jit_forward(cfg)(params, tokens, k=2)
  l16, aux = models.jit_forward(bf)(params_bf, tokens, k=2)
  chex.assert_type(l16, jnp.float32)
  chex.assert_tree_all_finite(aux)
  assert float(jnp.abs(l16 - l32).max()) < 0.05


# ---------------------------------------------------------------------------------------- attention/cache


def test_kv_cache_decode_equals_full_forward(family):
  cfg, params = family
  tokens = _tokens(cfg, t=10)
  fwd = models.jit_forward(cfg)
  full, _ = fwd(params, tokens, k=2)
  cache = models.init_cache(cfg, 2, 16)
  logits, _, cache = fwd(params, tokens[:, :6], k=2, cache=cache)
  steps = [logits]
  for i in range(6, 10):
    logits, _, cache = fwd(params, tokens[:, i:i + 1], k=2, cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
  assert int(cache.index) == 10


def test_packed_segments_do_not_attend_across(family):
  cfg, params = family
  fwd = models.jit_forward(cfg)
  a, b = _tokens(cfg, b=1, t=5, seed=3), _tokens(cfg, b=1, t=7, seed=4)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7])
  logits, _ = fwd(params, packed, k=2, segment_ids=seg)
  la, _ = fwd(params, a, k=2)
  lb, _ = fwd(params, b, k=2)
  np.testing.assert_allclose(logits, jnp.concatenate([la, lb], axis=1), rtol=1e-5, atol=1e-5)


def test_config_validation():
  with pytest.raises(models.ConfigError, match="k_pre"):
    models.tiny("olmoe", k_pre=9)
  with pytest.raises(models.ConfigError, match="num_kv_heads"):
    models.tiny("olmoe", num_kv_heads=3)
  with pytest.raises(models.ConfigError, match="model_type"):
    models.tiny("mixtral")
  with pytest.raises(models.ConfigError, match="gmm_impl"):
    models.tiny("olmoe", gmm_impl="cuda")
  with pytest.raises(models.ConfigError, match="dense_ffn"):
    models.tiny("qwen2_moe", moe_layers=(True, False))
