"""Pallas kernels in interpret mode (CPU): grouped matmuls vs ragged_dot / numpy, grads, the fused router."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import kernels, models
from phds_jax.kernels.pallas_gmm import gmm_pallas, make_work_items, tgmm_pallas
from phds_jax.kernels.pallas_routing import route_pallas
from phds_jax.models import router

TILES = dict(tile_m=16, tile_k=16, tile_n=16)
gmm_p = jax.jit(functools.partial(gmm_pallas, **TILES), static_argnames=("preferred_element_type",))
tgmm_p = jax.jit(functools.partial(tgmm_pallas, **TILES))

# (m, k, n, group_sizes): zeros, sizes off the tile, m off the tile, trailing rows past the sum, k/n < tile.
CASES = [
    pytest.param(40, 32, 16, [5, 0, 20, 3], id="zeros_offtile_trailing"),
    pytest.param(20, 8, 12, [0, 0, 0], id="all_empty"),
]


def _operands(m, g, k, n, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(m, k)), dtype), jnp.asarray(rng.normal(size=(g, k, n)), dtype)


def _np_gmm(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _np_tgmm(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, start = np.zeros((len(sizes), lhs.shape[1], rhs.shape[1])), 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start:start + size].T @ rhs[start:start + size]
    start += size
  return out


def test_work_items_cover_every_tile_once_per_group():
  items = make_work_items(jnp.array([5, 0, 20, 3], jnp.int32), num_tiles=3, tile_m=16)
  np.testing.assert_array_equal(items.tile, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(items.group, [0, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(items.lo, [0, 5, 5, 25, 0, 0])
  np.testing.assert_array_equal(items.hi, [5, 25, 25, 28, 0, 0])
  np.testing.assert_array_equal(items.first_tile, [1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(items.first_group, [1, 1, 0, 1, 0, 0])


@pytest.mark.parametrize("m,k,n,sizes", CASES)
def test_gmm_tgmm_fp32(m, k, n, sizes):
  lhs, rhs = _operands(m, len(sizes), k, n)
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm_p(lhs, rhs, gs)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[sum(sizes):], 0.0)  # trailing rows are exact zeros
  t = tgmm_p(lhs, out, gs)
  np.testing.assert_allclose(t, _np_tgmm(lhs, out, sizes), rtol=1e-5, atol=1e-4)


def test_gmm_tgmm_random_sizes():
  rng = np.random.default_rng(1)
  sizes = [int(s) for s in rng.multinomial(45, np.ones(5) / 5)]
  sizes[int(rng.integers(5))] = 0
  lhs, rhs = _operands(50, 5, 16, 32, seed=1)  # m off the tile, n spans two tiles
  gs = jnp.asarray(sizes, jnp.int32)
  np.testing.assert_allclose(gmm_p(lhs, rhs, gs), _np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tgmm_p(lhs, lhs, gs), _np_tgmm(lhs, lhs, sizes), rtol=1e-5, atol=1e-4)


def test_gmm_bf16():
  sizes = [7, 0, 19, 4]
  lhs, rhs = _operands(33, 4, 32, 16, jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  want = _np_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
  out = gmm_p(lhs, rhs, gs)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=5e-2)
  out32 = gmm_p(lhs, rhs, gs, preferred_element_type=jnp.float32)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out32, want, rtol=1e-3, atol=1e-3)  # fp32 accumulation of bf16 products
  t = tgmm_p(lhs, lhs, gs)
  assert t.dtype == jnp.bfloat16
  want_t = _np_tgmm(lhs.astype(jnp.float32), lhs.astype(jnp.float32), sizes)
  np.testing.assert_allclose(t.astype(jnp.float32), want_t, rtol=2e-2, atol=1e-1)


def test_gmm_grads_match_ragged_dot():
  sizes = [5, 0, 20, 3]
  lhs, rhs = _operands(40, 4, 16, 32, seed=2)
  gs = jnp.asarray(sizes, jnp.int32)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=(40, 32)), jnp.float32)

  def grads(f):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b, gs) * cot), argnums=(0, 1)))(lhs, rhs)

  got = grads(functools.partial(gmm_pallas, **TILES))
  want = grads(jax.lax.ragged_dot)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(got[0][sum(sizes):], 0.0)


@pytest.mark.parametrize("mode", router.ROUTER_MODES)
@pytest.mark.parametrize("norm", (False, True))
def test_route_pallas_matches_route(mode, norm):
  k_pre, num_tokens, num_experts = 3, 13, 8  # T off the token tile
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(num_tokens, num_experts)), jnp.float32)
  logits = logits.at[0, 5].set(logits[0, 2])  # a tie: lower index first, as lax.top_k
  for k in range(1, k_pre + 1):
    want = router.route(logits, k=k, k_pre=k_pre, mode=mode, eps=1e-3, norm_topk_prob=norm)
    w, e, counts = route_pallas(logits, k=k, k_pre=k_pre, mode=mode, eps=1e-3, norm_topk_prob=norm)
    assert w.shape == e.shape == want.weights_TxS.shape and e.dtype == jnp.int32
    np.testing.assert_array_equal(e, want.experts_TxS)
    np.testing.assert_allclose(w, want.weights_TxS, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(counts, want.expert_load_E)


def test_dispatch_pallas_on_cpu():
  sizes = [0, 9, 14]
  lhs, rhs = _operands(30, 3, 16, 8, seed=5)
  gs = jnp.asarray(sizes, jnp.int32)
  out = jax.jit(lambda a, b, g: kernels.gmm(a, b, g, impl="pallas", tile_m=16))(lhs, rhs, gs)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
  t = kernels.tgmm(lhs, out, gs, impl="pallas", tile_m=16)
  np.testing.assert_allclose(t, _np_tgmm(lhs, out, sizes), rtol=1e-5, atol=1e-4)
  for macs in (None, 1, 1 << 40):  # the interpreter is never a CPU "auto" choice
    assert "pallas" not in kernels.impl_order("auto", backend="cpu", dense_macs=macs)


def test_tiny_model_pallas_equals_ragged_dot():
  tokens = jnp.arange(8, dtype=jnp.int32)[None] % 7
  params = models.init_params(models.tiny("olmoe", gmm_impl="ragged_dot"), jax.random.PRNGKey(0))
  logits = {}  # params don't depend on gmm_impl: init once (it is the slow part)
  for impl in ("pallas", "ragged_dot"):
    logits[impl] = models.jit_forward(models.tiny("olmoe", gmm_impl=impl))(params, tokens, k=2)[0]
  np.testing.assert_allclose(logits["pallas"], logits["ragged_dot"], rtol=1e-5, atol=1e-5)
