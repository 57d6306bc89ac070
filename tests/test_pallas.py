"""Pallas kernels: both grouped-matmul families (Triton for GPU, Mosaic for TPU) vs ragged_dot / numpy, grads,
the routing kernels, the model and a train step; and their GPU/TPU lowerings, by exporting for those platforms.

On CPU the kernels run under the Pallas interpreter. On a GPU or TPU the family native to it runs for real
(the other one interpreted), so the first hardware check is:
    JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=float32 python -m pytest -q tests/test_pallas.py
(float32 matmul precision: exact fp32 dots instead of TF32, for the fp32 tolerances here.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import kernels, models
from phds_jax.kernels import pallas_gmm_tpu, pallas_gmm_triton, pallas_permute, tiling
from phds_jax.kernels.pallas_gmm import BACKENDS, gmm_pallas, tgmm_pallas
from phds_jax.kernels.pallas_gmm_tpu import make_work_items
from phds_jax.kernels.pallas_routing import route_pallas
from phds_jax.models import router
from tests.grouped_reference import np_gmm, np_tgmm, operands

TILES = dict(tile_m=16, tile_k=16, tile_n=16)


NATIVE = {"triton": "gpu", "mosaic_tpu": "tpu"}


def _opts(backend):
  """Run a family natively on its own platform, interpreted elsewhere."""
  return dict(backend=backend, interpret=None if NATIVE[backend] == jax.default_backend() else True, **TILES)


def _jitted(backend):
  gmm = jax.jit(functools.partial(gmm_pallas, **_opts(backend)), static_argnames=("preferred_element_type",))
  return gmm, jax.jit(functools.partial(tgmm_pallas, **_opts(backend)))


JITTED = {backend: _jitted(backend) for backend in BACKENDS}
backends = pytest.mark.parametrize("backend", BACKENDS)

# (m, k, n, group_sizes): zeros, sizes off the tile, m off the tile, trailing rows past the sum, k/n < tile.
CASES = [
    pytest.param(40, 32, 16, [5, 0, 20, 3], id="zeros_offtile_trailing"),
    pytest.param(20, 16, 16, [0, 0, 0], id="all_empty"),
]


def test_work_items_cover_every_tile_once_per_group():
  items = make_work_items(jnp.array([5, 0, 20, 3], jnp.int32), num_tiles=3, tile_m=16)
  np.testing.assert_array_equal(items.tile, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(items.group, [0, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(items.lo, [0, 5, 5, 25, 0, 0])
  np.testing.assert_array_equal(items.hi, [5, 25, 25, 28, 0, 0])
  np.testing.assert_array_equal(items.first_tile, [1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(items.first_group, [1, 1, 0, 1, 0, 0])


@backends
@pytest.mark.parametrize("m,k,n,sizes", CASES)
def test_gmm_tgmm_fp32(backend, m, k, n, sizes):
  gmm_p, tgmm_p = JITTED[backend]
  lhs, rhs = operands(m, len(sizes), k, n)
  gs = jnp.asarray(sizes, jnp.int32)
  out = gmm_p(lhs, rhs, gs)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[sum(sizes):], 0.0)  # trailing rows are exact zeros
  t = tgmm_p(lhs, out, gs)
  np.testing.assert_allclose(t, np_tgmm(lhs, out, sizes), rtol=1e-5, atol=1e-4)


@backends
def test_gmm_tgmm_random_sizes(backend):
  gmm_p, tgmm_p = JITTED[backend]
  rng = np.random.default_rng(1)
  sizes = [int(s) for s in rng.multinomial(45, np.ones(5) / 5)]
  sizes[int(rng.integers(5))] = 0
  lhs, rhs = operands(50, 5, 16, 32, seed=1)  # m off the tile, n spans two tiles
  gs = jnp.asarray(sizes, jnp.int32)
  np.testing.assert_allclose(gmm_p(lhs, rhs, gs), np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tgmm_p(lhs, lhs, gs), np_tgmm(lhs, lhs, sizes), rtol=1e-5, atol=1e-4)


@backends
def test_gmm_bf16(backend):
  gmm_p, tgmm_p = JITTED[backend]
  sizes = [7, 0, 19, 4]
  lhs, rhs = operands(33, 4, 32, 16, jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  want = np_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
  out = gmm_p(lhs, rhs, gs)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=5e-2)
  out32 = gmm_p(lhs, rhs, gs, preferred_element_type=jnp.float32)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out32, want, rtol=1e-3, atol=1e-3)  # fp32 accumulation of bf16 products
  t = tgmm_p(lhs, lhs, gs)
  assert t.dtype == jnp.bfloat16
  want_t = np_tgmm(lhs.astype(jnp.float32), lhs.astype(jnp.float32), sizes)
  np.testing.assert_allclose(t.astype(jnp.float32), want_t, rtol=2e-2, atol=1e-1)


@backends
def test_gmm_grads_bf16_inputs_fp32_output(backend):
  """fp32 output from bf16 operands: the backward multiplies an fp32 cotangent by bf16 weights/activations."""
  sizes = [9, 0, 17, 6]
  lhs, rhs = operands(36, 4, 32, 16, jnp.bfloat16, seed=6)
  gs = jnp.asarray(sizes, jnp.int32)
  cot = jnp.asarray(np.random.default_rng(8).normal(size=(36, 16)), jnp.float32)

  def grads(f, a, b):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * cot), argnums=(0, 1)))(a, b)

  got = grads(lambda a, b: gmm_pallas(a, b, gs, preferred_element_type=jnp.float32, **_opts(backend)), lhs, rhs)
  want = grads(lambda a, b: jax.lax.ragged_dot(a, b, gs), lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  for g, w, like in zip(got, want, (lhs, rhs)):
    assert g.dtype == like.dtype
    np.testing.assert_allclose(g.astype(jnp.float32), w, rtol=2e-2, atol=6e-2)  # bf16 rounding of the grads


@backends
def test_gmm_grads_match_ragged_dot(backend):
  sizes = [5, 0, 20, 3]
  lhs, rhs = operands(40, 4, 16, 32, seed=2)
  gs = jnp.asarray(sizes, jnp.int32)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=(40, 32)), jnp.float32)

  def grads(f):
    return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b, gs) * cot), argnums=(0, 1)))(lhs, rhs)

  got = grads(functools.partial(gmm_pallas, **_opts(backend)))
  want = grads(jax.lax.ragged_dot)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(got[0][sum(sizes):], 0.0)


@pytest.mark.parametrize("mode", router.ROUTER_MODES)
@pytest.mark.parametrize("norm", (False, True))
def test_route_pallas_matches_route(mode, norm):
  """The fused kernel vs the jnp router at every k: 6 experts (padded to 8 inside), T off the token tile,
  a tie, masked tokens; weights, experts, load, aux losses and the gradient of a loss through them."""
  k_pre, num_tokens, num_experts = 3, 13, 6
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(num_tokens, num_experts)), jnp.float32)
  logits = logits.at[0, 5].set(logits[0, 2])  # a tie: lower index first, as lax.top_k
  mask = jnp.asarray(rng.random(num_tokens) > 0.3, jnp.float32)
  probe = jnp.asarray(rng.normal(size=(num_tokens, router.num_slots(k_pre, k_pre, mode))), jnp.float32)
  for k in range(1, k_pre + 1):
    def run(z, impl):
      r = router.route(z, k=k, k_pre=k_pre, mode=mode, eps=1e-3, norm_topk_prob=norm, token_mask_T=mask,
                       impl=impl)
      return jnp.sum(r.weights_TxS * probe[:, :r.weights_TxS.shape[1]]) + r.lb_loss + 0.1 * r.z_loss, r

    (_, want), g_want = jax.value_and_grad(run, has_aux=True)(logits, "jax")
    (_, got), g_got = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)(logits, "pallas")
    assert got.weights_TxS.shape == want.weights_TxS.shape and got.experts_TxS.dtype == jnp.int32
    np.testing.assert_array_equal(got.experts_TxS, want.experts_TxS)
    np.testing.assert_allclose(got.weights_TxS, want.weights_TxS, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.expert_load_E, want.expert_load_E)
    np.testing.assert_allclose(got.lb_loss, want.lb_loss, rtol=1e-6)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-7)


def test_route_pallas_validates():
  logits = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match="k=3 <= slots=2"):
    route_pallas(logits, k=3, slots=2)
  with pytest.raises(ValueError, match="multiple of 8"):
    route_pallas(logits, k=1, slots=1, tile_t=12)
  with pytest.raises(ValueError, match="router impl 'triton'"):
    router.route(logits, k=1, k_pre=1, impl="triton")


def test_dispatch_pallas_on_cpu():
  sizes = [0, 9, 14]
  lhs, rhs = operands(30, 3, 16, 16, seed=5)
  gs = jnp.asarray(sizes, jnp.int32)
  out = jax.jit(lambda a, b, g: kernels.gmm(a, b, g, impl="pallas", tile_m=16))(lhs, rhs, gs)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
  t = kernels.tgmm(lhs, out, gs, impl="pallas", tile_m=16)
  np.testing.assert_allclose(t, np_tgmm(lhs, out, sizes), rtol=1e-5, atol=1e-4)
  for macs in (None, 1, 1 << 40):  # the interpreter is never a CPU "auto" choice
    assert "pallas" not in kernels.impl_order("auto", backend="cpu", dense_macs=macs)


def test_tiny_model_pallas_equals_ragged_dot():
  tokens = jnp.arange(8, dtype=jnp.int32)[None] % 7
  params = models.init_params(models.tiny("olmoe", gmm_impl="ragged_dot"), jax.random.PRNGKey(0))
  logits = {}  # params don't depend on the impls: init once (it is the slow part)
  for impl in ("pallas", "ragged_dot"):
    cfg = models.tiny("olmoe", gmm_impl=impl, routing_impl="pallas" if impl == "pallas" else "jax")
    logits[impl] = models.jit_forward(cfg)(params, tokens, k=2)[0]
  np.testing.assert_allclose(logits["pallas"], logits["ragged_dot"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The Triton family's pieces, and both families' hardware lowerings (exported for CUDA / TPU from CPU).
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [False, True], ids=["tile_loops_groups", "program_per_group"])
@pytest.mark.parametrize("m,sizes", [(40, [5, 0, 20, 3]), (8, [0, 3, 0, 0, 2, 0, 3, 0])], ids=["train", "decode"])
def test_triton_gmm_both_grid_layouts(split, m, sizes):
  """Both gmm grids of the Triton family (one program per row tile looping over its groups; one program per
  (row tile, group) with fp32 partials summed after), forward and with transposed weights."""
  lhs, rhs = operands(m, len(sizes), 32, 32, seed=9)
  gs = jnp.asarray(sizes, jnp.int32)
  interpret = jax.default_backend() != "gpu"
  for rhs_in, transpose in ((rhs, False), (jnp.swapaxes(rhs, 1, 2), True)):
    out = pallas_gmm_triton.gmm_triton(lhs, rhs_in, gs, tile_m=16, tile_k=16, tile_n=16, interpret=interpret,
                                       transpose_rhs=transpose, split_groups=split)
    np.testing.assert_allclose(out, np_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[sum(sizes):], 0.0)


def test_triton_tile_group_ranges_skip_empty_groups():
  from phds_jax.kernels.grouped_matmul import group_bounds
  bounds = group_bounds(jnp.array([5, 0, 20, 3], jnp.int32), m=40)
  lo, hi, starts, ends = pallas_gmm_triton._tile_group_ranges(bounds, 4, num_tiles=3, tile_m=16)
  # Tile 0 (rows 0-15): groups 0, 2 -> listed positions 0, 1; tile 1: groups 2, 3; tile 2 (32-47): none.
  np.testing.assert_array_equal(lo, [0, 1, 3])
  np.testing.assert_array_equal(hi, [2, 3, 3])
  np.testing.assert_array_equal(np.asarray(bounds.nonempty_G)[:3], [0, 2, 3])
  np.testing.assert_array_equal(starts[:3], [0, 5, 25])
  np.testing.assert_array_equal(ends[:3], [5, 25, 28])


def test_triton_tiles_are_powers_of_two_dividing_the_dim():
  assert tiling.pow2_tile(1408, 128, "n") == 128
  assert tiling.pow2_tile(1408, 512, "n") == 128  # 1408 = 11 x 128
  assert tiling.pow2_tile(12, 16, "n") == 4
  with pytest.raises(NotImplementedError, match="n=12 has no power-of-two tile >= 16"):
    tiling.pow2_tile(12, 64, "n", minimum=16)


def test_pallas_backend_foreign_to_platform_falls_through():
  lhs, rhs = operands(32, 2, 32, 32)
  gs = jnp.array([20, 12], jnp.int32)
  for backend in [b for b in BACKENDS if NATIVE[b] != jax.default_backend()]:
    with pytest.raises(NotImplementedError, match="lowers only on"):
      gmm_pallas(lhs, rhs, gs, backend=backend, interpret=False)
  with pytest.raises(ValueError, match="unknown pallas gmm backend"):
    gmm_pallas(lhs, rhs, gs, backend="cuda")


def _export(fn, platform, *shapes):
  """Lower for `platform` on this CPU machine; returns the StableHLO text (Pallas custom call included)."""
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()


# OLMoE (d 2048, ffn 1024, 64 experts) and Qwen1.5-MoE (ffn 1408 = 11 x 128, 60 experts) in bf16: forward,
# d lhs (transposed weights) and d rhs, for 4096 routed rows.
LOWERING_SHAPES = [pytest.param(64, 2048, 1024, id="olmoe"), pytest.param(60, 2048, 1408, id="qwen1.5")]


@pytest.mark.parametrize("experts,d,f", LOWERING_SHAPES)
@pytest.mark.parametrize("platform,fwd,tgmm", [
    ("cuda", pallas_gmm_triton.gmm_triton, pallas_gmm_triton.tgmm_triton),
    ("tpu", pallas_gmm_tpu.gmm_mosaic, pallas_gmm_tpu.tgmm_mosaic),
])
def test_gmm_kernels_lower_for_hardware(experts, d, f, platform, fwd, tgmm):
  bf16, i32, rows = jnp.bfloat16, jnp.int32, 4096

  def fwd_and_grads(x, w, g, gs):
    return fwd(x, w, gs), fwd(g, w, gs, transpose_rhs=True), tgmm(x, g, gs)

  # The cotangent g is fp32 (as when the forward asks for fp32 output from bf16 operands): the kernels must
  # cast mixed operands to one type (Triton's dot rejects f32 x bf16).
  text = _export(fwd_and_grads, platform, ((rows, d), bf16), ((experts, d, f), bf16), ((rows, f), jnp.float32),
                 ((experts,), i32))
  target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  assert text.count(f"custom_call @{target}") == 3
  if platform == "cuda":  # a decode step (8 routed rows): the program-per-group grid
    decode = lambda x, w, gs: fwd(x, w, gs, split_groups=True)
    text = _export(decode, platform, ((8, d), bf16), ((experts, d, f), bf16), ((experts,), i32))
    assert text.count(f"custom_call @{target}") == 1


def test_train_step_pallas_equals_ragged_dot():
  """One PHDS train step (two microbatches at different k, soft routing) with the Pallas kernels (grouped
  matmul, router, permutation) vs ragged_dot + the jnp routing: same loss, gradient norm and update."""
  import optax
  from phds_jax.training import step as train_step_lib
  rng = np.random.default_rng(7)
  tokens = jnp.asarray(rng.integers(0, 128, size=(2, 1, 12)), jnp.int32)  # [M, B, L]
  batch = dict(tokens=tokens, targets=jnp.roll(tokens, -1, axis=-1), loss_mask=jnp.ones_like(tokens),
               positions=jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape),
               segment_ids=jnp.ones_like(tokens))
  tx = optax.sgd(0.1)  # plain SGD: the update is -lr * grad (Adam would amplify float noise in ~0 grads)
  params = models.init_params(models.tiny("olmoe", gmm_impl="ragged_dot"), jax.random.PRNGKey(1))
  results = {}
  for impl in ("pallas", "ragged_dot"):
    cfg = models.tiny("olmoe", gmm_impl=impl, routing_impl="pallas" if impl == "pallas" else "jax")
    step = train_step_lib.make_train_step(cfg, (1, 4), tx, mode="soft")
    state, metrics = jax.jit(step)(train_step_lib.init_state(params, tx), batch, jnp.array([0, 1], jnp.int32))
    results[impl] = (metrics["loss"], metrics["grad_norm"], state.params)
  (loss_p, norm_p, params_p), (loss_r, norm_r, params_r) = results["pallas"], results["ragged_dot"]
  np.testing.assert_allclose(loss_p, loss_r, rtol=1e-5)
  np.testing.assert_allclose(norm_p, norm_r, rtol=1e-4)
  update = lambda new: jax.tree_util.tree_map(jnp.subtract, new, params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                         update(params_p), update(params_r))


@pytest.mark.parametrize("experts,k,mode", [(64, 8, "soft"), (64, 3, "hard"), (60, 4, "soft")],
                         ids=["olmoe-soft", "olmoe-hard3", "qwen1.5-soft"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_router_kernel_lowers_for_hardware(experts, k, mode, platform):
  slots = router.num_slots(k, 8 if experts == 64 else 4, mode)
  backend = "triton" if platform == "cuda" else "mosaic_tpu"
  fn = lambda z, m: route_pallas(z, k=k, slots=slots, token_mask=m, backend=backend, interpret=False)
  text = _export(fn, platform, ((4096, experts), jnp.bfloat16), ((4096,), jnp.float32))
  target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
  assert text.count(f"custom_call @{target}") == 1


def test_permutation_kernels_lower_for_cuda():
  """Row gather (dispatch) and the fused un-permute + weighted combine, OLMoE-sized, for the Triton lowering."""
  tokens, slots, d = 4096, 8, 2048
  gather = lambda x, i: pallas_permute.gather_rows_pallas(x, i)
  combine = lambda y, i, w: pallas_permute.weighted_combine_pallas(y, i, w)
  text = _export(gather, "cuda", ((tokens, d), jnp.bfloat16), ((tokens * slots,), jnp.int32))
  text += _export(combine, "cuda", ((tokens * slots, d), jnp.bfloat16), ((tokens, slots), jnp.int32),
                  ((tokens, slots), jnp.float32))
  assert text.count("custom_call @__gpu$xla.gpu.triton") == 2


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="its real failure is a device kernel on CPU")
def test_device_compile_probe_reports_failures_once():
  """The probe that lets `auto` fall through when a device's compiler rejects a kernel: a real failure here
  (a non-interpreted Triton kernel cannot compile on CPU) and a real success (the interpreted one)."""
  from phds_jax.kernels import pallas_gmm, probes
  avals = [jax.ShapeDtypeStruct((32, 16), jnp.float32), jax.ShapeDtypeStruct((2, 16, 16), jnp.float32),
           jax.ShapeDtypeStruct((2,), jnp.int32)]
  device_opts, interp_opts = ("triton", False, 16, 16, 16), ("triton", True, 16, 16, 16)
  failing = pallas_gmm._gmm_fwd_and_bwd(device_opts, jnp.float32)
  error = probes.compiles_on_device(failing, *avals)
  assert error is not None and "interpret" in error
  cached = len(probes._COMPILES)
  assert probes.compiles_on_device(pallas_gmm._gmm_fwd_and_bwd(device_opts, jnp.float32), *avals) == error
  assert len(probes._COMPILES) == cached  # an equal probe hits the cache
  with pytest.raises(NotImplementedError, match="pallas gmm kernels do not compile here"):
    probes.require_compiles(failing, *avals, failure="pallas gmm kernels do not compile here")
  assert probes.compiles_on_device(pallas_gmm._gmm_fwd_and_bwd(interp_opts, jnp.float32), *avals) is None


@pytest.mark.parametrize("platform,target,calls", [("gpu", "cuda", 22), ("tpu", "tpu", 14)])
def test_whole_model_grad_lowers_with_every_kernel(platform, target, calls):
  """Forward + backward of a tiny Qwen2-MoE (2 MoE layers, shared expert) with gmm_impl='auto' and
  routing_impl='pallas', lowered for a GPU / TPU from this CPU host via `kernels.lowering_for`. Per layer,
  GPU: router, gather, 2 gmm, combine; backward gather, combine, 2 gmm(rhsᵀ), 2 tgmm = 11 Triton calls.
  TPU: router, 2 gmm, 2 gmm(rhsᵀ), 2 tgmm = 7 Mosaic calls (the permutation stays jnp there)."""
  cfg = models.tiny("qwen2_moe", routing_impl="pallas")
  model = models.build(cfg)
  params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))

  def loss(p, tokens):
    logits, aux = model.apply({"params": p}, tokens, k=2, mode="soft")
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + aux["lb_loss"]

  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with kernels.lowering_for(platform):
    assert kernels.target_platform() == platform
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=[target], disabled_checks=checks)(
        params, jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert kernels.target_platform() == jax.default_backend()
  text = exported.mlir_module()
  custom_call = "__gpu$xla.gpu.triton" if target == "cuda" else "tpu_custom_call"
  assert text.count(f"custom_call @{custom_call}") == calls
  assert '"chlo.ragged_dot"' not in text  # nothing fell back to ragged_dot
  with pytest.raises(ValueError, match="unknown platform 'cuda'"):
    with kernels.lowering_for("cuda"):
      pass
