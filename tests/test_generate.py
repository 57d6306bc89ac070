"""Generation engine: greedy output equals transformers' `generate` at every dialled k (all three families),
the few-token MoE path equals the grouped one, sampling follows its distribution, seeds reproduce."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from phds_jax import hf, models
from phds_jax.models import experts as experts_lib
from phds_jax.serve import engine
from phds_jax.serve.sampling import SamplingParams, sample
from tests.hf_models import make_tiny_hf_model

EOS = 1  # tests/hf_models.py's eos_token_id


def _hf_greedy(model_dir, prompt: list[int], new: int) -> list[int]:
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=new, eos_token_id=EOS, pad_token_id=2)
  ids = out[0, len(prompt):].tolist()
  return ids[:ids.index(EOS)] if EOS in ids else ids


@pytest.mark.parametrize("family,ks", [("olmoe", (1, 4)), ("qwen2_moe", (2,)), ("qwen3_moe", (3,))])
def test_greedy_equals_transformers_generate_at_k(family, ks, tmp_path):
  _, path = make_tiny_hf_model(family, tmp_path, seed=3)
  cfg, params = hf.load(path)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 9, 7)]  # left padding is exercised
  new = 8
  for k in ks:
    ours = engine.generate(cfg, params, prompts, k=k, sampling=SamplingParams(max_new_tokens=new), eos_ids=(EOS,))
    hf.save(tmp_path / f"k{k}", cfg, params, k=k)
    for prompt, got in zip(prompts, ours):
      assert got == _hf_greedy(tmp_path / f"k{k}", prompt, new), (family, k, prompt)


def test_per_request_lengths_eos_and_validation():
  cfg = models.tiny("olmoe")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  prompts = [[5, 6, 7], [9, 10]]
  full = engine.generate(cfg, params, prompts, k=2, sampling=SamplingParams(max_new_tokens=6))
  assert [len(x) for x in full] == [6, 6]
  short = engine.generate(cfg, params, prompts, k=2,
                          sampling=[SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=5)])
  assert short == [full[0][:2], full[1][:5]]
  eos = full[0][3]
  cut = engine.generate(cfg, params, prompts[:1], k=2, sampling=SamplingParams(max_new_tokens=6), eos_ids=(eos,))
  assert cut[0] == full[0][:full[0].index(eos)]
  with pytest.raises(ValueError, match="exceed max_len"):
    engine.generate(cfg, params, [[1] * 10], k=2, sampling=SamplingParams(max_new_tokens=8), max_len=16)
  with pytest.raises(ValueError, match="top_p"):
    engine.generate(cfg, params, prompts, k=2, sampling=SamplingParams(top_p=0.0))
  with pytest.raises(ValueError, match="k=9 is out of range"):
    engine.generate(cfg, params, prompts, k=9)
  with pytest.raises(ValueError, match="empty"):
    engine.generate(cfg, params, [[]], k=2)


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
  cfg = models.tiny("qwen2_moe")
  params = models.init_params(cfg, jax.random.PRNGKey(1))
  hot = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
  alone = engine.generate(cfg, params, [[4, 5, 6]], k=2, sampling=hot)
  batched = engine.generate(cfg, params, [[4, 5, 6], [8, 9]], k=2,
                            sampling=[hot, SamplingParams(max_new_tokens=6)])
  assert alone[0] == batched[0]
  other_seeds = [engine.generate(cfg, params, [[4, 5, 6]], k=2, sampling=SamplingParams(
      max_new_tokens=6, temperature=1.5, top_p=0.9, seed=s))[0] for s in (8, 9)]
  assert any(o != alone[0] for o in other_seeds)
  greedy = engine.generate(cfg, params, [[4, 5, 6]], k=2, sampling=SamplingParams(max_new_tokens=6))
  top1 = engine.generate(cfg, params, [[4, 5, 6]], k=2,
                         sampling=SamplingParams(max_new_tokens=6, temperature=2.0, top_k=1, seed=3))
  assert top1 == greedy


def test_sampler_draws_from_the_truncated_distribution():
  logits_V = np.log(np.array([0.4, 0.25, 0.15, 0.12, 0.08]))
  n = 4000

  def draws(temperature, top_p, top_k):
    fn = jax.jit(lambda s: sample(jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, 5)),
                                  jnp.zeros((n,), jnp.int32), jnp.full((n,), temperature), jnp.full((n,), top_p),
                                  jnp.full((n,), top_k, jnp.int32), s))
    got = np.asarray(fn(jnp.arange(n, dtype=jnp.int32)))
    chex.assert_shape(got, (n,))
    return np.bincount(got, minlength=5) / n

  def expected(temperature, top_p, top_k):
    p = np.exp(logits_V / temperature)
    p /= p.sum()
    keep = (np.cumsum(p) - p < top_p) & (np.arange(5) < (top_k or 5))
    q = np.where(keep, p, 0.0)
    return q / q.sum()

  for setting in [(1.0, 1.0, 0), (1.0, 0.7, 0), (0.5, 1.0, 3), (2.0, 0.9, 4)]:
    np.testing.assert_allclose(draws(*setting), expected(*setting), atol=0.03, err_msg=str(setting))


def test_gathered_moe_path_equals_grouped():
  rng = np.random.default_rng(0)
  t, s, e, d, f = 3, 2, 8, 16, 12
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  w = jnp.asarray(rng.random((t, s)), jnp.float32)
  ex = jnp.asarray(rng.choice(e, size=(t, s)), jnp.int32)
  wi = jnp.asarray(rng.normal(size=(e, d, 2 * f)) * 0.2, jnp.float32)
  wo = jnp.asarray(rng.normal(size=(e, f, d)) * 0.2, jnp.float32)
  want = experts_lib.routed_experts_dense(x, w, ex, wi, wo)
  for loop in (True, False):
    got = jax.jit(functools.partial(experts_lib.routed_experts_gathered, loop=loop))(x, w, ex, wi, wo)
    chex.assert_shape(got, (t, d))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"loop={loop}")
  assert experts_lib.use_gathered(1, 8, 64, "gather") and not experts_lib.use_gathered(64, 8, 64, "gather")
  assert not experts_lib.use_gathered(1, 8, 64, "grouped")


def _decode_hlo_ops(cfg, params, k: int) -> int:
  cache = engine.init_slots(cfg, 1, 32)
  args = (params, cache, np.ones(1, np.int32), np.ones(1, bool), np.zeros(1, np.int32),
          tuple(np.zeros(1, dt) for dt in (np.float32, np.float32, np.int32, np.int32)))
  text = engine.decode_step_fn(cfg).lower(*args, k=k).compile().as_text()
  entry = text[text.index("ENTRY"):]
  return sum(1 for line in entry.splitlines() if " = " in line and "parameter(" not in line)


def test_decode_step_with_gathered_experts_matches_and_compiles_smaller():
  cfg = models.tiny("olmoe", num_experts=16)
  params = models.init_params(cfg, jax.random.PRNGKey(2))
  grouped = cfg.replace(decode_moe="grouped")
  prompt = [[3, 4, 5, 6]]
  out = engine.generate(cfg, params, prompt, k=2, sampling=SamplingParams(max_new_tokens=5))
  assert out == engine.generate(grouped, params, prompt, k=2, sampling=SamplingParams(max_new_tokens=5))
  assert _decode_hlo_ops(cfg, params, 2) < _decode_hlo_ops(grouped, params, 2)


def test_time_decode_reports_per_step_samples():
  cfg = models.tiny("olmoe")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  for steps in (1, 4):
    ms = engine.time_decode(cfg, params, k=2, batch_size=2, context_len=8, new_tokens=4, repeats=2,
                            steps_per_call=steps)
    chex.assert_shape(ms, (8,))
    assert np.all(ms > 0) and np.all(np.isfinite(ms))


def test_decode_benchmark_runs_every_column(capsys):
  from benchmarks import decode
  decode.main(["--preset=tiny", "--batch", "1", "--ks", "2", "--context=8", "--new_tokens=2", "--repeats=1"])
  out = capsys.readouterr().out
  assert "kernels per layer in one compiled decode step" in out and "n/a" not in out, out
  rows = [line.split() for line in out.splitlines() if line[:3].strip() == "2"]
  assert len(rows) == 1 and len(rows[0]) == 7, out  # k, gather, grouped, hf, floor, % of floor, hf/ours
  assert "ours vs transformers" in out and "time strictly falls with k" in out
