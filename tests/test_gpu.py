"""On a GPU only (`JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_gpu.py`; skipped elsewhere): the fused
kernels that CPU tests can only check through XLA or an interpreter, run for real and held to the references.

  * cuDNN attention (attention_impl="cudnn", and "auto" choosing it for bf16) against the einsum reference:
    causal, left padding, packed segments, GQA, KV-cache prefill + decode;
  * kernels.gmm(impl="auto") on this device kind's tuned order, and tokamax where it imports, against
    jax.lax.ragged_dot, forward and gradients;
  * the prefill benchmark end to end with every implementation (a failing one shows as n/a, not a crash).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import kernels, models
from phds_jax.kernels import tokamax_gmm
from phds_jax.models import attention as attn_lib
from phds_jax.models import config as config_lib

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")]

B, T = 2, 128


def _bf16_models():
  ref = config_lib.tiny("qwen3_moe", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                        dtype="bfloat16", param_dtype="float32", attention_impl="xla")
  return ref, ref.replace(attention_impl="cudnn"), models.init_params(ref, jax.random.PRNGKey(0))


def test_auto_attention_picks_cudnn_for_bf16_here():
  q = jnp.zeros((1, T, 4, 64), jnp.bfloat16)
  kv = jnp.zeros((1, T, 2, 64), jnp.bfloat16)
  mask = attn_lib.self_attention_mask(None, None, (1, T))
  assert attn_lib.attention_impl_for("auto", q, kv, kv, mask, causal=True) == "cudnn"
  assert attn_lib.attention_impl_for("auto", q[:, :1], kv, kv, mask[:, :1], causal=False) == "xla"  # decode
  assert attn_lib.attention_impl_for("auto", q.astype(jnp.float32), kv, kv, mask, causal=True) == "xla"


def test_cudnn_attention_matches_reference():
  ref, fused, params = _bf16_models()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (B, T)), jnp.int32)
  ones = jnp.ones((B, T), jnp.int32)
  left_pad = ones.at[0, :17].set(0)
  segments = jnp.concatenate([jnp.ones((B, 50), jnp.int32), 2 * jnp.ones((B, T - 50), jnp.int32)], axis=1)
  for mask, seg in ((ones, None), (left_pad, None), (ones, segments)):
    want, _ = models.build(ref).apply({"params": params}, tokens, k=2, attention_mask=mask, segment_ids=seg)
    got, _ = models.build(fused).apply({"params": params}, tokens, k=2, attention_mask=mask, segment_ids=seg)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=0.1, rtol=0.05)
  outs = {}
  for cfg in (ref, fused):
    forward = models.jit_forward(cfg)
    cache = models.init_cache(cfg, batch_size=B, max_len=2 * T)
    logits, _, cache = forward(params, tokens, k=2, attention_mask=left_pad, cache=cache)
    step, _, _ = forward(params, tokens[:, :1], k=2, cache=cache)
    outs[cfg.attention_impl] = np.concatenate([np.asarray(logits)[:, -1], np.asarray(step)[:, -1]])
  np.testing.assert_allclose(outs["cudnn"], outs["xla"], atol=0.1, rtol=0.05)


def _gmm_case(dtype=jnp.bfloat16, m=4096, g=64, k=512, n=256):
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), dtype)
  sizes = rng.multinomial(m - 100, rng.dirichlet(np.ones(g))).astype(np.int32)  # 100 rows past the sum
  return lhs, rhs, jnp.asarray(sizes)


def _check_against_ragged_dot(impl: str):
  lhs, rhs, gs = _gmm_case()
  cot = jnp.asarray(np.random.default_rng(1).normal(size=(lhs.shape[0], rhs.shape[2])), jnp.float32)

  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) * cot), argnums=(0, 1)))

  ref_fn = lambda a, b: jax.lax.ragged_dot(a.astype(jnp.float32), b.astype(jnp.float32), gs)  # noqa: E731
  out = jax.jit(lambda a, b: kernels.gmm(a, b, gs, impl=impl))(lhs, rhs)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_fn(lhs, rhs)), atol=0.1, rtol=0.05)
  assert not np.asarray(out[int(gs.sum()):], np.float32).any(), "rows past sum(group_sizes) are zero"
  (_, got), (_, want) = loss(lambda a, b: kernels.gmm(a, b, gs, impl=impl))(lhs, rhs), loss(ref_fn)(lhs, rhs)
  for g_, w_ in zip(got, want):
    scale = float(np.abs(np.asarray(w_, np.float32)).max())
    np.testing.assert_allclose(np.asarray(g_, np.float32), np.asarray(w_, np.float32), atol=0.02 * scale)


def test_auto_gmm_uses_the_tuned_order_and_matches_ragged_dot():
  assert kernels.impl_order("auto") == kernels.auto_order(kind=jax.devices()[0].device_kind)
  _check_against_ragged_dot("auto")


def test_tokamax_gmm_matches_ragged_dot():
  try:
    tokamax_gmm.import_tokamax()
  except NotImplementedError as e:
    pytest.skip(str(e))
  _check_against_ragged_dot("tokamax")


def test_prefill_benchmark_runs_every_implementation(capsys):
  from benchmarks import prefill

  prefill.main(["--preset", "tiny", "--dtype", "bfloat16", "--batch", "1", "--seq_len", "256", "--ks", "4", "1",
                "--repeats", "2", "--gmm-impls", "auto", "pallas", "ragged_dot", "tokamax",
                "--attention-impls", "xla", "cudnn"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if re.match(r"\s+[41]\s+[01]\.\d\d\s", line)]
  assert len(rows) == 2 and all(len(re.findall(r"\d+\.\d+", r)) >= 12 for r in rows), out
