"""Attention implementations: the fused path (jax.nn.dot_product_attention; XLA's on CPU, cuDNN's on GPU) against
the einsum reference, at the model level for every masking case the model produces, and the 'auto' rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import models
from phds_jax.models import attention as attn_lib
from phds_jax.models import config as config_lib

VOCAB, B, T = 128, 2, 12


def _models(**overrides):
  """Two configs with one parameter tree: the reference ('xla') and the fused path ('cudnn')."""
  ref = config_lib.tiny("qwen3_moe", num_layers=1, num_heads=4, num_kv_heads=2, attention_impl="xla",
                       **overrides)  # GQA 2:1, one layer: compile time is the cost here
  fused = ref.replace(attention_impl="cudnn")
  params = models.init_params(ref, jax.random.PRNGKey(0))
  return ref, fused, params


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (B, T)), jnp.int32)


def test_fused_matches_reference_causal_padding_and_packing():
  """One compiled forward per implementation, fed three masking cases (all-ones padding mask and one segment
  is the plain causal case)."""
  ref, fused, params = _models()
  tokens = _tokens()
  ones = jnp.ones((B, T), jnp.int32)
  left_pad = jnp.asarray([[0, 0, 0] + [1] * (T - 3), [1] * T], jnp.int32)
  segments = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 5], jnp.int32)
  cases = {"causal": (ones, ones), "left_padding": (left_pad, ones), "packed": (ones, segments)}
  fwd = {cfg.attention_impl: jax.jit(lambda p, x, m, s, cfg=cfg: models.build(cfg).apply(
      {"params": p}, x, k=2, attention_mask=m, segment_ids=s)[0]) for cfg in (ref, fused)}
  for name, (mask, seg) in cases.items():
    want, got = fwd["xla"](params, tokens, mask, seg), fwd["cudnn"](params, tokens, mask, seg)
    real = np.asarray(mask).astype(bool)
    assert np.isfinite(np.asarray(got)).all(), name
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5, err_msg=name)


def test_fused_matches_reference_with_kv_cache():
  """Left-padded prompt into a cache, then two single-token decode steps: every step's logits agree."""
  ref, fused, params = _models()
  prompt, mask = _tokens(1)[:, :8], jnp.asarray([[0, 0] + [1] * 6, [1] * 8], jnp.int32)
  outs = {}
  for cfg in (ref, fused):
    forward = models.jit_forward(cfg)
    cache = models.init_cache(cfg, batch_size=B, max_len=16)
    logits, _, cache = forward(params, prompt, k=3, attention_mask=mask, cache=cache)
    steps = [logits[:, -1]]
    for tok in (jnp.asarray([[5], [7]], jnp.int32), jnp.asarray([[9], [11]], jnp.int32)):
      logits, _, cache = forward(params, tok, k=3, cache=cache)
      steps.append(logits[:, -1])
    outs[cfg.attention_impl] = np.stack(steps)
  np.testing.assert_allclose(outs["cudnn"], outs["xla"], rtol=2e-5, atol=2e-5)


def test_fused_gradients_match_reference():
  ref, fused, params = _models()
  tokens = _tokens(2)
  segments = jnp.asarray([[1] * 6 + [2] * 6, [1] * 12], jnp.int32)

  def loss(cfg):
    def f(p):
      logits, _ = models.build(cfg).apply({"params": p}, tokens, k=2, mode="soft", segment_ids=segments)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
    return jax.jit(jax.grad(f))(params)

  want, got = loss(ref), loss(fused)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_attend_fully_masked_queries_finite_and_bf16():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.bfloat16)
  k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.bfloat16)
  v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.bfloat16)
  mask = attn_lib.self_attention_mask(jnp.asarray([[0, 0, 1, 1, 1], [1] * 5]), None, (2, 5))
  want = attn_lib.attend(q, k, v, mask, impl="xla")
  got = attn_lib.attend(q, k, v, mask, impl="cudnn", causal=True)
  assert got.shape == want.shape == (2, 5, 32) and got.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(got, np.float32)).all()
  real = np.asarray(mask).any(-1)  # queries with at least one key: the padding rows' values are unused
  np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real], atol=2e-2)


def test_auto_on_cpu_is_the_reference_and_impls_are_validated():
  """The default ('auto') must not change CPU numerics: it resolves to the einsum reference, bit for bit."""
  ref, _, params = _models()
  auto = ref.replace(attention_impl="auto")
  assert config_lib.ModelConfig.attention_impl == "auto"
  q = jnp.zeros((1, 4, 4, 16), jnp.bfloat16)
  kv = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
  mask = attn_lib.self_attention_mask(None, None, (1, 4))
  assert attn_lib.attention_impl_for("auto", q, kv, kv, mask, causal=True) == "xla"
  assert attn_lib.attention_impl_for("cudnn", q, kv, kv, mask, causal=True) == "cudnn"
  tokens = _tokens(4)
  want, _ = models.jit_forward(ref)(params, tokens, k=2)
  got, _ = models.jit_forward(auto)(params, tokens, k=2)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(config_lib.ConfigError, match="attention_impl"):
    config_lib.tiny(attention_impl="flash")
