r"""Dial k on one checkpoint: load an HF MoE directory (or make a small random one) and report every k.

    python -m phds_jax.dial_k                     # offline: a small random OLMoE-style model
    python -m phds_jax.dial_k --hf_dir=/path/to/OLMoE-1B-7B-0125 --dtype=bfloat16

For each k in 1..k_pre it prints the expert FLOP share, the forward time, and how far the next-token
distribution moves from the k_pre one (KL and top-1 agreement). Point it at a PHDS-trained checkpoint
(`runs/<run>/final/hf`) and at its base to see how much closer to k_pre the low-k outputs stay.
"""

from __future__ import annotations

import os
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp

from phds_jax import hf, models
from phds_jax.timing import median_ms

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF model directory; default: a random model made offline.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter and compute dtype.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per forward.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random model and tokens.")

RANDOM_MODEL_CONFIG = dict(model_type="olmoe", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                   num_kv_heads=4, head_dim=32, num_experts=32, k_pre=8, moe_ffn=64, qk_norm="full")


def make_random_checkpoint(directory: str, seed: int = 0) -> str:
  """Writes a random OLMoE-style model as an HF directory (exercises hf.save/hf.load end to end)."""
  cfg = models.ModelConfig(**RANDOM_MODEL_CONFIG)
  params = models.init_params(cfg, jax.random.PRNGKey(seed))
  hf.save(directory, cfg, params)
  return directory


def per_k_report(cfg: models.ModelConfig, params, tokens) -> list[dict]:
  """One row per k: expert FLOP share, forward ms, KL(p_kpre || p_k) and top-1 agreement with k_pre."""
  fwd = models.jit_forward(cfg)
  ref_logp = jax.nn.log_softmax(fwd(params, tokens, k=cfg.k_pre)[0])
  rows = []
  for k in range(1, cfg.k_pre + 1):
    logits, _ = fwd(params, tokens, k=k)
    logp = jax.nn.log_softmax(logits)
    kl = jnp.mean(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1))
    agree = jnp.mean(jnp.argmax(logp, -1) == jnp.argmax(ref_logp, -1))
    rows.append(dict(k=k, expert_share=k / cfg.k_pre, ms=median_ms(fwd, params, tokens, k=k, repeats=5, warmup=1),
                     kl=float(kl), top1_agree=float(agree)))
  return rows


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    path = _HF_DIR.value or make_random_checkpoint(os.path.join(tmp, "random-olmoe"), _SEED.value)
    cfg, params = hf.load(path, dtype=_DTYPE.value)
  cfg = cfg.replace(dtype=_DTYPE.value)
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
  print(f"model: {cfg.model_type}, {n_params / 1e6:.1f}M params, {cfg.num_layers} layers, "
        f"{cfg.num_experts} experts, k_pre={cfg.k_pre}, backend={jax.default_backend()}")
  tokens = jax.random.randint(jax.random.PRNGKey(_SEED.value), (_BATCH.value, _SEQ.value), 0, cfg.vocab_size)
  rows = per_k_report(cfg, params, tokens)
  print(f"{'k':>3} {'experts':>8} {'fwd ms':>8} {'t/t_pre':>8} {'KL vs k_pre':>12} {'top1 agree':>11}")
  t_pre = rows[-1]["ms"]
  for r in rows:
    print(f"{r['k']:>3} {r['expert_share']:>8.2f} {r['ms']:>8.2f} {r['ms'] / t_pre:>8.2f} {r['kl']:>12.5f} "
          f"{r['top1_agree']:>11.3f}")


if __name__ == "__main__":
  app.run(main)
