"""Logit parity with the transformers (PyTorch) reference at every k, with padding and the KV cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from phds_jax import hf, models
from tests.hf_models import make_tiny_hf_model

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe")
ATOL = 2e-5


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  _, path = make_tiny_hf_model(request.param, str(directory))
  cfg, params = hf.load(path)
  return request.param, path, cfg, params


def _padded_batch(vocab: int, seq: int = 11):
  """Row 0 full, row 1 right-padded, row 2 left-padded."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (3, seq))
  mask = np.ones((3, seq), np.int64)
  mask[1, -4:] = 0
  mask[2, :3] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def _torch_logits(path: str, k: int, tokens, mask, positions) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, num_experts_per_tok=k, attn_implementation="eager", dtype=torch.float32).eval()
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions))
  return out.logits.numpy()


def test_logits_match_transformers_at_every_k(checkpoint):
  family, path, cfg, params = checkpoint
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  forward = models.jit_forward(cfg)
  real = mask.astype(bool)
  previous = None
  for k in range(1, cfg.k_pre + 1):
    ref = _torch_logits(path, k, tokens, mask, positions)
    ours, _ = forward(params, jnp.asarray(tokens), k=k, attention_mask=jnp.asarray(mask))
    chex.assert_shape(ours, ref.shape)
    chex.assert_type(ours, jnp.float32)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=ATOL, rtol=1e-4,
                               err_msg=f"{family} k={k}")
    if previous is not None:  # the levels really differ
      assert np.abs(ref[real] - previous[real]).max() > 1e-4
    previous = ref


def test_soft_mode_with_zero_eps_matches_transformers(checkpoint):
  family, path, cfg, params = checkpoint
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  forward = models.jit_forward(cfg.replace(router_eps=0.0))
  k = 2
  ours, _ = forward(params, jnp.asarray(tokens), k=k, mode="soft", attention_mask=jnp.asarray(mask))
  ref = _torch_logits(path, k, tokens, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=ATOL, rtol=1e-4)


def test_cache_decode_matches_transformers(checkpoint):
  """Left-padded prompt prefill + token-by-token decode equals transformers' full forward."""
  family, path, cfg, params = checkpoint
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  tokens, mask, positions = tokens[[0, 2]], mask[[0, 2]], positions[[0, 2]]  # full row and left-padded row
  k, prompt = 2, 6
  forward = models.jit_forward(cfg)
  cache = models.init_cache(cfg, batch_size=2, max_len=16)
  logits, _, cache = forward(params, jnp.asarray(tokens[:, :prompt]), k=k,
                             attention_mask=jnp.asarray(mask[:, :prompt]), cache=cache)
  steps = [np.asarray(logits)]
  for i in range(prompt, tokens.shape[1]):
    logits, _, cache = forward(params, jnp.asarray(tokens[:, i:i + 1]), k=k, cache=cache)
    steps.append(np.asarray(logits))
  ours = np.concatenate(steps, axis=1)
  ref = _torch_logits(path, k, tokens, mask, positions)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=1e-4)


def test_saved_checkpoint_serves_at_dialled_k(checkpoint, tmp_path):
  """hf.save(k=2) -> transformers loads it at top-2 and reproduces our k=2 logits."""
  family, path, cfg, params = checkpoint
  out = str(tmp_path / "dialled")
  hf.save(out, cfg, params, k=2)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert model.config.num_experts_per_tok == 2
  tokens, mask, positions = _padded_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions)).logits.numpy()
  ours, _ = models.jit_forward(cfg)(params, jnp.asarray(tokens), k=2, attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=ATOL, rtol=1e-4)
