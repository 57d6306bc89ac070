"""Grouped matmul: every implementation against jax.lax.ragged_dot and a numpy per-group loop; dispatch rules."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import kernels
from phds_jax.kernels import grouped_matmul as gm
from phds_jax.kernels import registry
from phds_jax.kernels import tuning
from tests.grouped_reference import np_gmm, np_tgmm, operands

GMM_IMPLS = ("auto", "jax", "ragged_dot", "dense")
_STATIC = ("impl", "tile_m", "preferred_element_type")
gmm = jax.jit(kernels.gmm, static_argnames=_STATIC)  # one compilation per case instead of op-by-op dispatch
tgmm = jax.jit(kernels.tgmm, static_argnames=_STATIC)
ragged_dot = jax.jit(jax.lax.ragged_dot)

# (m, G, k, n, group_sizes, tile_m): zero-size groups, sizes off the tile, m off the tile, trailing rows past
# sum(group_sizes), G=1, everything in one group, a tile taller than m.
CASES = [
    pytest.param(40, 5, 12, 7, [0, 13, 0, 19, 8], 32, id="zeros_offtile"),
    pytest.param(37, 4, 16, 9, [5, 0, 11, 6], 16, id="m_offtile_trailing"),
    pytest.param(30, 1, 8, 5, [17], 128, id="G1_trailing_tile_gt_m"),
    pytest.param(33, 6, 8, 10, [0, 0, 33, 0, 0, 0], 8, id="one_group"),
    pytest.param(20, 3, 8, 4, [0, 0, 0], 8, id="all_empty"),
]


@pytest.mark.parametrize("impl", ("jax", "ragged_dot", "dense"))  # "auto" is "jax" here: see the dispatch tests
@pytest.mark.parametrize("m,G,k,n,sizes,tile_m", CASES)
def test_gmm_fp32_matches_references(impl, m, G, k, n, sizes, tile_m):
  lhs, rhs = operands(m, G, k, n)
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm(lhs, rhs, gs, impl=impl, tile_m=tile_m)
  chex.assert_shape(out, (m, n))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, ragged_dot(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
  assert not np.asarray(out[sum(sizes):]).any(), "rows past sum(group_sizes) must be exactly zero"


@pytest.mark.parametrize("seed", range(3))
def test_gmm_tiled_random_group_sizes(seed):
  """Many group boundaries per tile and empty groups, at several tiles."""
  rng = np.random.default_rng(seed)
  m, G = 61, 9
  sizes = rng.multinomial(m - seed * 3, rng.dirichlet(np.full(G, 0.5))).astype(np.int32)
  sizes[rng.integers(G)] = 0
  sizes[-1] += m - seed * 3 - sizes.sum()
  lhs, rhs = operands(m, G, 8, 6, seed=seed)
  gs = jnp.asarray(sizes)
  want = np_gmm(lhs, rhs, sizes)
  for tile_m in (8, 64):
    np.testing.assert_allclose(gmm(lhs, rhs, gs, impl="jax", tile_m=tile_m), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", GMM_IMPLS)
def test_gmm_bf16(impl):
  m, G, k, n, sizes = 45, 4, 32, 16, [10, 0, 21, 9]
  lhs, rhs = operands(m, G, k, n, jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm(lhs, rhs, gs, impl=impl, tile_m=16)
  chex.assert_shape(out, (m, n))
  chex.assert_type(out, jnp.bfloat16)
  want = np_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=5e-2)
  assert not np.asarray(out[sum(sizes):].astype(jnp.float32)).any()
  out32 = gmm(lhs, rhs, gs, impl=impl, tile_m=16, preferred_element_type=jnp.float32)
  chex.assert_type(out32, jnp.float32)
  np.testing.assert_allclose(out32, want, rtol=1e-5, atol=1e-4)  # fp32 accumulation of exact bf16 products


def _grads(fn, lhs, rhs, gs, cot):
  loss = lambda a, b, g: jnp.sum(fn(a, b, g).astype(jnp.float32) * cot)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(lhs, rhs, gs)


@pytest.mark.parametrize("impl,m,G,k,n,sizes,tile_m", [("jax", *CASES[i].values) for i in (0, 1, 2)] + [
    ("dense", *CASES[1].values)])
def test_gmm_grads_match_ragged_dot(impl, m, G, k, n, sizes, tile_m):
  lhs, rhs = operands(m, G, k, n)
  gs = jnp.asarray(sizes, jnp.int32)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=(m, n)), jnp.float32)
  dlhs, drhs = _grads(lambda a, b, g: kernels.gmm(a, b, g, impl=impl, tile_m=tile_m), lhs, rhs, gs, cot)
  want_dlhs, want_drhs = _grads(jax.lax.ragged_dot, lhs, rhs, gs, cot)
  chex.assert_shape((dlhs, drhs), (lhs.shape, rhs.shape))
  np.testing.assert_allclose(dlhs, want_dlhs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(drhs, want_drhs, rtol=1e-5, atol=1e-4)
  assert not np.asarray(dlhs[sum(sizes):]).any()


def test_gmm_tiled_grads_bf16_keep_input_dtypes():
  lhs, rhs = operands(40, 3, 16, 8, jnp.bfloat16)
  gs = jnp.asarray([12, 0, 25], jnp.int32)
  cot = jnp.ones((40, 8), jnp.float32)
  dlhs, drhs = _grads(lambda a, b, g: gm.gmm_tiled(a, b, g, tile_m=8), lhs, rhs, gs, cot)
  chex.assert_type((dlhs, drhs), (jnp.bfloat16, jnp.bfloat16))
  f32 = lambda x: x.astype(jnp.float32)
  want_dlhs, want_drhs = _grads(jax.lax.ragged_dot, f32(lhs), f32(rhs), gs, cot)
  np.testing.assert_allclose(f32(dlhs), want_dlhs, rtol=2e-2, atol=5e-2)
  np.testing.assert_allclose(f32(drhs), want_drhs, rtol=2e-2, atol=1e-1)


def test_gmm_jit_and_retrace_free_group_sizes():
  """Group sizes are traced values: one compilation serves every routing."""
  lhs, rhs = operands(50, 4, 8, 8)
  f = jax.jit(lambda a, b, g: kernels.gmm(a, b, g, tile_m=16))
  for sizes in ([10, 20, 0, 20], [0, 0, 0, 50], [3, 3, 3, 3]):
    gs = jnp.asarray(sizes, jnp.int32)
    np.testing.assert_allclose(f(lhs, rhs, gs), np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  assert f._cache_size() == 1


@pytest.mark.parametrize("impl", ("jax", "ragged_dot", "dense"))
@pytest.mark.parametrize("m,G,k,n,sizes,tile_m", [CASES[0], CASES[1], CASES[2], CASES[4]])
def test_tgmm_matches_numpy(impl, m, G, k, n, sizes, tile_m):
  rng = np.random.default_rng(2)
  lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  out = tgmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), impl=impl, tile_m=tile_m)
  chex.assert_shape(out, (G, k, n))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, np_tgmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)


def test_nonfinite_rows_outside_groups_do_not_leak():
  """Rows past sum(group_sizes) may hold garbage (inf/NaN): outputs and weight grads must ignore them."""
  lhs, rhs = operands(40, 3, 8, 24)
  lhs = lhs.at[35:].set(jnp.inf)
  d = jnp.ones((40, 24)).at[36:].set(jnp.nan)
  gs = jnp.asarray([10, 0, 25], jnp.int32)
  out = gmm(lhs, rhs, gs, impl="jax", tile_m=32)
  np.testing.assert_allclose(out, np_gmm(lhs[:35], rhs, [10, 0, 25]).tolist() + [[0] * 24] * 5, atol=1e-4)
  t = tgmm(lhs, d, gs, impl="jax", tile_m=32)
  np.testing.assert_allclose(t, np_tgmm(lhs[:35], d[:35], [10, 0, 25]), rtol=1e-5, atol=1e-4)


def test_tgmm_bf16_dtype():
  lhs = jnp.ones((20, 8), jnp.bfloat16)
  rhs = jnp.ones((20, 4), jnp.bfloat16)
  gs = jnp.asarray([5, 15], jnp.int32)
  chex.assert_type(tgmm(lhs, rhs, gs), jnp.bfloat16)
  out = tgmm(lhs, rhs, gs, preferred_element_type=jnp.float32)
  chex.assert_type(out, jnp.float32)
  np.testing.assert_array_equal(out[:, 0, 0], [5.0, 15.0])


def test_group_bounds():
  sizes = np.array([0, 7, 30, 0, 1, 1, 40, 0], np.int32)
  bounds = jax.jit(gm.group_bounds, static_argnums=1)(jnp.asarray(sizes), 100)
  ends = np.cumsum(sizes)
  np.testing.assert_array_equal(bounds.ends_G, ends)
  np.testing.assert_array_equal(bounds.starts_G, ends - sizes)
  assert int(bounds.count) == 5
  np.testing.assert_array_equal(bounds.nonempty_G[:5], [1, 2, 4, 5, 6])
  # (tile, group) pairs within the static bound: every tile once plus one per group boundary.
  pairs = {(r // 16, g) for g in range(len(sizes)) for r in range(ends[g] - sizes[g], ends[g])}
  assert len(pairs) <= gm.num_work_items(100, len(sizes), 16)


def test_tile_ladder_and_empty_lhs():
  assert gm.tile_ladder(8192) == (128, 16) and gm.tile_ladder(8192, 100) == (100, 16)
  assert gm.tile_ladder(40, 64) == (40, 16) and gm.tile_ladder(5) == (5,) and gm.tile_ladder(50, 8) == (8,)
  out = gm.gmm_tiled(jnp.zeros((0, 4)), jnp.zeros((3, 4, 2)), jnp.zeros((3,), jnp.int32))
  chex.assert_shape(out, (0, 2))
  np.testing.assert_array_equal(gm.tgmm_tiled(jnp.zeros((0, 4)), jnp.zeros((0, 2)), jnp.zeros((3,), jnp.int32)),
                                np.zeros((3, 4, 2)))


# ----------------------------------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------------------------------

def _jaxpr_text(fn, *args) -> str:
  """fn's jaxpr printed, nested jaxprs included: which primitives a dispatch actually traced."""
  return str(jax.make_jaxpr(fn)(*args))


def test_auto_on_cpu_uses_tiled_jax():
  assert jax.default_backend() == "cpu"
  assert kernels.impl_order("auto") == ("jax", "ragged_dot")
  lhs, rhs = jnp.zeros((512, 32)), jnp.zeros((64, 32, 32))  # G·m·k·n = 2^25: above the tiny-problem cut
  gs = jnp.full((64,), 8, jnp.int32)
  auto_jaxpr = _jaxpr_text(lambda a, b: kernels.gmm(a, b, gs), lhs, rhs)
  assert "ragged_dot_general" not in auto_jaxpr and "custom_vjp_call" in auto_jaxpr
  assert "ragged_dot_general" in _jaxpr_text(lambda a, b: kernels.gmm(a, b, gs, impl="ragged_dot"), lhs, rhs)
  assert "ragged_dot_general" not in _jaxpr_text(lambda a, d: kernels.tgmm(a, d, gs), lhs, lhs)


def test_auto_on_cpu_tiny_problem_uses_ragged_dot():
  assert kernels.impl_order("auto", dense_macs=kernels.SMALL_PROBLEM_MACS) == ("ragged_dot", "jax")
  lhs, rhs = operands(16, 2, 4, 4)
  gs = jnp.asarray([6, 10], jnp.int32)
  assert "ragged_dot_general" in _jaxpr_text(lambda a, b: kernels.gmm(a, b, gs), lhs, rhs)
  assert "ragged_dot_general" not in _jaxpr_text(lambda a, b: kernels.gmm(a, b, gs, impl="jax"), lhs, rhs)


# Pallas declines (NotImplementedError) a contracting dim of 200: no power-of-two tile >= 16 divides it (the
# Triton kernels' rule) and the 128 tile doesn't either (Mosaic's): a real case, no mocks, that makes every
# order fall through past it.
PALLAS_DECLINES_K = 200


def test_accelerator_order_falls_through_pallas():
  """The GPU/TPU order starts with Pallas (then tokamax, absent here); where both decline, ragged_dot must
  take the case, and each skipped implementation is reported by a warning."""
  order = kernels.impl_order("auto", backend="gpu")
  assert order == ("pallas", "tokamax", "ragged_dot", "jax")
  assert kernels.impl_order("auto", backend="tpu") == order
  lhs, rhs = operands(16, 2, PALLAS_DECLINES_K, 4)
  gs = jnp.asarray([6, 10], jnp.int32)
  jaxpr = _jaxpr_text(lambda a, b: kernels.dispatch("gmm", order, a, b, gs, None, None), lhs, rhs)
  assert "ragged_dot_general" in jaxpr and "pallas_call" not in jaxpr
  registry._WARNED.clear()
  with pytest.warns(RuntimeWarning, match="'pallas' unavailable.*using 'ragged_dot'"):
    out = kernels.dispatch("gmm", order, lhs, rhs, gs, None, None)
  np.testing.assert_allclose(out, np_gmm(lhs, rhs, [6, 10]), rtol=1e-5, atol=1e-4)
  with pytest.raises(NotImplementedError, match="no gmm implementation"):
    kernels.dispatch("gmm", ("pallas", "pallas"), lhs, rhs, gs, None, None)


def test_unknown_impl_lists_valid_ones():
  lhs, rhs = operands(8, 2, 4, 4)
  gs = jnp.asarray([4, 4], jnp.int32)
  with pytest.raises(ValueError, match="auto, tokamax, pallas, jax, ragged_dot, dense"):
    kernels.gmm(lhs, rhs, gs, impl="triton")
  with pytest.raises(ValueError, match="valid"):
    kernels.tgmm(lhs, lhs, gs, impl="cuda")


def test_explicit_impl_surfaces_its_error():
  """An explicit impl has no fallback: its NotImplementedError reaches the caller, naming the impl."""
  lhs, rhs = operands(8, 2, PALLAS_DECLINES_K, 4)
  gs = jnp.asarray([4, 4], jnp.int32)
  with pytest.raises(NotImplementedError, match="impl='pallas' is unavailable.*use impl='auto'"):
    kernels.gmm(lhs, rhs, gs, impl="pallas")
  with pytest.raises(NotImplementedError, match="impl='pallas'"):
    kernels.tgmm(lhs, lhs, gs, impl="pallas")


@pytest.mark.parametrize("lhs_shape,rhs_shape,gs_shape,match", [
    ((2, 8, 4), (2, 4, 3), (2,), "lhs must be 2-D"),
    ((8, 4), (4, 3), (2,), "rhs must be 3-D"),
    ((8, 4), (2, 5, 3), (2,), "contracting dims differ"),
    ((8, 4), (2, 4, 3), (3,), r"group_sizes must have shape \(2,\)"),
    ((8, 4), (2, 4, 3), (2, 1), "group_sizes must have shape"),
])
def test_gmm_shape_errors(lhs_shape, rhs_shape, gs_shape, match):
  with pytest.raises(ValueError, match=match):
    kernels.gmm(jnp.zeros(lhs_shape), jnp.zeros(rhs_shape), jnp.zeros(gs_shape, jnp.int32))


def test_type_and_tgmm_shape_errors():
  with pytest.raises(TypeError, match="integer"):
    kernels.gmm(jnp.zeros((8, 4)), jnp.zeros((2, 4, 3)), jnp.zeros((2,), jnp.float32))
  with pytest.raises(ValueError, match="row counts differ"):
    kernels.tgmm(jnp.zeros((8, 4)), jnp.zeros((9, 3)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="2-D"):
    kernels.tgmm(jnp.zeros((8, 4)), jnp.zeros((2, 8, 3)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="tile_m must be positive"):
    kernels.gmm(jnp.zeros((8, 4)), jnp.zeros((2, 4, 3)), jnp.zeros((2,), jnp.int32), impl="jax", tile_m=0)


# ----------------------------------------------------------------------------------------------------------
# The tuned auto table and tokamax (which cannot import on this CI's jax 0.10 / Python 3.11).
# ----------------------------------------------------------------------------------------------------------

def test_tuned_table_rows_are_valid_and_end_in_an_always_available_impl():
  rows = {**kernels.AUTO_ORDERS, "cpu_small": tuning.CPU_SMALL_ORDER}
  for kind, order in rows.items():
    assert set(order) <= set(kernels.IMPLS) - {"auto"}, kind
    assert order[-1] in ("jax", "ragged_dot") and len(set(order)) == len(order), kind
  assert set(tuning.SOURCE) == set(kernels.AUTO_ORDERS), "every row says where its order comes from"


def test_tuned_table_lookup_exact_prefix_platform():
  table = {"cpu": ("jax",), "gpu": ("pallas", "jax"), "tpu": ("ragged_dot",), "NVIDIA H1": ("dense",),
           "NVIDIA H100": ("tokamax", "jax")}
  assert tuning.auto_order("gpu", kind="NVIDIA H100", table=table) == ("tokamax", "jax")
  assert tuning.auto_order("gpu", kind="NVIDIA H100 80GB HBM3", table=table) == ("tokamax", "jax")  # longest prefix
  assert tuning.auto_order("gpu", kind="NVIDIA A100-SXM4-80GB", table=table) == ("pallas", "jax")
  assert tuning.auto_order("tpu", kind="TPU v5 lite", table=table) == ("ragged_dot",)
  assert tuning.auto_order("cpu", kind="cpu", dense_macs=1, table=table) == tuning.CPU_SMALL_ORDER
  assert kernels.impl_order("auto", backend="gpu", kind="NVIDIA H200") == ("tokamax", "pallas", "ragged_dot", "jax")
  assert kernels.impl_order("auto") == kernels.AUTO_ORDERS["cpu"]  # this machine's device kind is "cpu"
  assert kernels.device_kind() == jax.devices()[0].device_kind
  with kernels.lowering_for("gpu"):
    assert kernels.device_kind() == "gpu"  # no local device to ask when lowering for another platform


def test_tokamax_unavailable_falls_back_with_a_warning():
  """Here tokamax cannot run (not importable on jax 0.10, and CPU has no tokamax kernel): impl="tokamax"
  names the reason; an order starting with it falls back to the next implementation, warning once."""
  lhs, rhs = operands(24, 3, 8, 5)
  sizes = [9, 0, 11]
  gs = jnp.asarray(sizes, jnp.int32)
  with pytest.raises(NotImplementedError, match="impl='tokamax' is unavailable.*tokamax"):
    kernels.gmm(lhs, rhs, gs, impl="tokamax")
  with pytest.raises(NotImplementedError, match="tokamax"):
    kernels.tgmm(lhs, lhs, gs, impl="tokamax")
  registry._WARNED.clear()
  with pytest.warns(RuntimeWarning, match="'tokamax' unavailable.*using 'jax'"):
    out = kernels.dispatch("gmm", ("tokamax", "jax"), lhs, rhs, gs, None, None)
  np.testing.assert_allclose(out, np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the same reason is reported once per process, not per call site
    kernels.dispatch("gmm", ("tokamax", "jax"), lhs, rhs, gs, None, None)
  with kernels.lowering_for("gpu"):  # a GPU lowering from this host cannot use tokamax either
    with pytest.raises(NotImplementedError, match="tokamax"):
      kernels.gmm_tokamax(lhs, rhs, gs)


def test_model_config_accepts_exactly_the_kernel_impls():
  from phds_jax.models import config as config_lib
  assert config_lib.GMM_IMPLS == kernels.IMPLS
  for impl in kernels.IMPLS:
    config_lib.tiny(gmm_impl=impl)
  with pytest.raises(config_lib.ConfigError, match="gmm_impl"):
    config_lib.tiny(gmm_impl="triton")
