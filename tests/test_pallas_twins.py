"""The routing-side Pallas kernels held directly to their pure-JAX twins (the grouped-matmul kernels are held
to theirs in test_pallas.py and test_kernels.py), under the Pallas interpreter on CPU; and the registry that
chooses between them (one table per op, impl names defined once, ordered fallbacks)."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import kernels
from phds_jax.kernels import pallas_permute, pallas_routing, permute, registry, routing
from phds_jax.models import config as config_lib

INTERPRET = jax.default_backend() != "gpu"  # the Triton kernels run natively on a GPU only

gather_kernel = jax.jit(functools.partial(pallas_permute.gather_rows_pallas, interpret=INTERPRET, tile_rows=8,
                                          tile_d=16))
gather_twin = jax.jit(permute.gather_rows_jax)


def _rows(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.asarray(rng.integers(-1000, 1000, size=shape), dtype)
  return jnp.asarray(rng.normal(size=shape), dtype)


# (rows R, width D, gathered N): N off the row tile, D a multiple of a small power of two only (24 = 3 x 8),
# D narrower than the tile, a single row.
GATHER_SHAPES = [pytest.param(20, 48, 37, id="ragged_N"), pytest.param(11, 24, 5, id="D24_few_rows"),
                 pytest.param(7, 8, 64, id="D_below_tile"), pytest.param(1, 16, 1, id="one_row")]
DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16"),
          pytest.param(jnp.int32, id="i32")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,d,n", GATHER_SHAPES)
def test_gather_rows_kernel_equals_twin(num_rows, d, n, dtype):
  x = _rows((num_rows, d), dtype)
  idx = jnp.asarray(np.random.default_rng(1).integers(0, num_rows, size=n), jnp.int32)  # repeats included
  got, want = gather_kernel(x, idx), gather_twin(x, idx)
  chex.assert_shape(got, (n, d))
  chex.assert_type(got, dtype)
  chex.assert_trees_all_equal(got, want)  # a gather moves bits: exactly equal
  np.testing.assert_array_equal(np.asarray(want, np.float64), np.asarray(x, np.float64)[np.asarray(idx)])


# (tokens T, slots S, width D, sorted rows N = T*S): T off the token tile, S = 1, D = 24.
COMBINE_SHAPES = [pytest.param(13, 3, 32, id="ragged_T"), pytest.param(9, 1, 24, id="one_slot_D24"),
                  pytest.param(40, 8, 16, id="many_slots")]


def _combine_operands(num_tokens, slots, d, dtype, seed=2):
  rng = np.random.default_rng(seed)
  ys = _rows((num_tokens * slots, d), dtype, seed)
  inverse = jnp.asarray(rng.permutation(num_tokens * slots).reshape(num_tokens, slots), jnp.int32)
  weights = jnp.asarray(rng.random((num_tokens, slots)), jnp.float32)
  return ys, inverse, weights


@pytest.mark.parametrize("dtype,out_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                             (jnp.bfloat16, jnp.float32)], ids=["f32", "bf16", "bf16_to_f32"])
@pytest.mark.parametrize("num_tokens,slots,d", COMBINE_SHAPES)
def test_weighted_combine_kernel_equals_twin(num_tokens, slots, d, dtype, out_dtype):
  ys, inverse, weights = _combine_operands(num_tokens, slots, d, dtype)
  got = pallas_permute.weighted_combine_pallas(ys, inverse, weights, out_dtype=out_dtype, tile_t=8, tile_d=16,
                                               interpret=INTERPRET)
  want = permute.weighted_combine_jax(ys, inverse, weights, out_dtype=out_dtype)
  chex.assert_shape((got, want), (num_tokens, d))
  chex.assert_type((got, want), out_dtype)
  tol = 1e-6 if out_dtype == jnp.float32 else 1e-2  # fp32 sums in both; bf16 only rounds the result
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  ref = np.einsum("tsd,ts->td", np.asarray(ys, np.float64)[np.asarray(inverse)], np.asarray(weights, np.float64))
  np.testing.assert_allclose(np.asarray(want, np.float32), ref, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))


def test_weighted_combine_integer_rows_unit_weights():
  """Integer rows summed with unit weights (the dispatch backward's combine): exact in both, default
  out_dtype is the rows' dtype."""
  ys, inverse, _ = _combine_operands(21, 4, 16, jnp.int32)
  ones = jnp.ones(inverse.shape, jnp.float32)
  got = pallas_permute.weighted_combine_pallas(ys, inverse, ones, interpret=INTERPRET)
  want = permute.weighted_combine_jax(ys, inverse, ones)
  chex.assert_type((got, want), jnp.int32)
  chex.assert_trees_all_equal(got, want)
  np.testing.assert_array_equal(want, np.asarray(ys)[np.asarray(inverse)].sum(axis=1))


@pytest.mark.parametrize("k,slots,norm", [(1, 1, False), (2, 4, False), (3, 3, True), (2, 6, True)])
def test_route_kernel_equals_twin(k, slots, norm):
  """The fused router vs route_jax: 6 experts (padded to 8 inside), 13 tokens (off the token tile), a tie,
  masked tokens; then the gradient of a loss through the weights (route_fused's VJP vs autodiff)."""
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(13, 6)), jnp.float32).at[0, 5].set(0.25).at[0, 2].set(0.25)
  mask = jnp.asarray(rng.random(13) > 0.3, jnp.float32)
  got = pallas_routing.route_pallas(logits, k=k, slots=slots, eps=1e-3, norm_topk_prob=norm, token_mask=mask,
                                    interpret=INTERPRET, backend="triton")
  want = routing.route_jax(logits, mask, k=k, slots=slots, eps=1e-3, norm_topk_prob=norm)
  chex.assert_shape((got[0], got[1], got[2]), ((13, slots), (13, slots), (6,)))
  chex.assert_type((got[0], got[1], got[2]), (jnp.float32, jnp.int32, jnp.float32))
  chex.assert_trees_all_equal(got[1], want[1])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(got[2], want[2])
  probe = jnp.asarray(rng.normal(size=(13, slots)), jnp.float32)
  loss = lambda impl: lambda z: jnp.sum(kernels.route(z, mask, k=k, slots=slots, eps=1e-3, norm_topk_prob=norm,
                                                      impl=impl)[0] * probe)
  np.testing.assert_allclose(jax.grad(loss("pallas"))(logits), jax.grad(loss("jax"))(logits), rtol=1e-5,
                             atol=1e-7)


def test_route_twin_is_top_k_of_the_softmax():
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(5, 8)), jnp.bfloat16)
  weights, experts, load = routing.route_jax(logits, jnp.ones((5,)), k=2, slots=3, eps=0.0, norm_topk_prob=False)
  probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)))
  order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
  np.testing.assert_array_equal(experts, order)
  np.testing.assert_allclose(weights[:, :2], np.take_along_axis(probs, order[:, :2], axis=1), rtol=1e-6)
  np.testing.assert_array_equal(weights[:, 2], 0.0)
  np.testing.assert_array_equal(load, np.bincount(order[:, :2].ravel(), minlength=8))


# ----------------------------------------------------------------------------------------------------------
# The registry.
# ----------------------------------------------------------------------------------------------------------

def test_impl_names_are_defined_once():
  assert config_lib.GMM_IMPLS is registry.GMM_IMPLS is kernels.GMM_IMPLS is kernels.IMPLS
  assert config_lib.ROUTING_IMPLS is registry.ROUTING_IMPLS is kernels.PERMUTE_IMPLS
  assert registry.GMM_IMPLS == ("auto", *registry.OPS["gmm"].impls) == registry.OPS["tgmm"].names
  for op in ("gather_rows", "weighted_combine", "route"):  # one setting (ModelConfig.routing_impl) for all three
    assert registry.OPS[op].names == registry.ROUTING_IMPLS == ("jax", "pallas"), op


def test_routing_orders_fall_back_to_the_twin():
  assert registry.OPS["route"].order("pallas") == ("pallas", "jax")
  assert registry.OPS["gather_rows"].order("jax") == ("jax",)
  with pytest.raises(ValueError, match="unknown permutation impl 'triton'; valid: jax, pallas"):
    kernels.gather_rows(jnp.zeros((4, 8)), jnp.zeros((2,), jnp.int32), impl="triton")
  with pytest.raises(ValueError, match="unknown router impl 'auto'"):
    kernels.route(jnp.zeros((4, 8)), jnp.ones((4,)), k=1, slots=1, eps=0.0, norm_topk_prob=False, impl="auto")


@pytest.mark.parametrize("impl", kernels.ROUTING_IMPLS)
def test_routing_ops_through_the_registry(impl):
  """kernels.gather_rows / weighted_combine / route with either impl equal the twins (CPU: the pallas impl
  is the interpreted kernel, as the model runs it)."""
  x = _rows((10, 32), jnp.float32)
  idx = jnp.asarray([3, 3, 0, 9, 1], jnp.int32)
  chex.assert_trees_all_equal(kernels.gather_rows(x, idx, impl=impl), x[idx])
  ys, inverse, weights = _combine_operands(6, 2, 32, jnp.float32)
  np.testing.assert_allclose(kernels.weighted_combine(ys, inverse, weights, out_dtype=jnp.float32, impl=impl),
                             permute.weighted_combine_jax(ys, inverse, weights, out_dtype=jnp.float32), rtol=1e-6,
                             atol=1e-6)
  logits = _rows((9, 4), jnp.float32)
  got = kernels.route(logits, jnp.ones((9,)), k=2, slots=3, eps=1e-6, norm_topk_prob=True, impl=impl)
  want = routing.route_jax(logits, jnp.ones((9,)), k=2, slots=3, eps=1e-6, norm_topk_prob=True)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_platform_limited_kernel_is_left_out_silently():
  """Mosaic TPU has no vector gather: the permutation kernels are not tried there, without a warning; the
  router kernel is (it has a Mosaic lowering)."""
  x = _rows((10, 32), jnp.float32)
  idx = jnp.asarray([1, 2], jnp.int32)
  with kernels.lowering_for("tpu"), warnings.catch_warnings():
    warnings.simplefilter("error")
    jaxpr = str(jax.make_jaxpr(lambda a: kernels.gather_rows(a, idx, impl="pallas"))(x))
  assert "pallas_call" not in jaxpr
  assert "pallas_call" in str(jax.make_jaxpr(lambda a: kernels.gather_rows(a, idx, impl="pallas"))(x))


def test_fallback_warns_once_per_reason(monkeypatch):
  """An implementation that declines (NotImplementedError) hands over to the next in the order, with one
  RuntimeWarning per (op, impl, reason); a lone explicit impl raises instead."""
  def decline(*args):
    raise NotImplementedError("declined for the test")

  monkeypatch.setitem(registry.OPS["gather_rows"].impls, "pallas", registry.Impl(decline))
  registry._WARNED.clear()
  x, idx = _rows((4, 8), jnp.float32), jnp.asarray([2, 0], jnp.int32)
  with pytest.warns(RuntimeWarning, match="gather_rows: implementation 'pallas' unavailable .declined for the "
                                          "test.; using 'jax'"):
    chex.assert_trees_all_equal(kernels.gather_rows(x, idx, impl="pallas"), x[idx])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kernels.gather_rows(x, idx, impl="pallas")
  with pytest.raises(NotImplementedError, match="gather_rows impl='pallas' is unavailable.*declined"):
    registry.dispatch("gather_rows", ("pallas",), x, idx)


def test_package_init_only_re_exports():
  """kernels/__init__.py holds imports and __all__, nothing else; every name it lists is importable."""
  import ast
  import inspect

  tree = ast.parse(inspect.getsource(kernels))
  body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body  # the docstring
  for node in body:
    is_all = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
    assert isinstance(node, ast.ImportFrom) or is_all, ast.dump(node)[:200]
  assert all(hasattr(kernels, name) for name in kernels.__all__)
