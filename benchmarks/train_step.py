r"""Train-step throughput: tokens/s and MFU, soft (PHDS training) vs hard routing, measured in one run.

    python -m benchmarks.train_step                      # demo-sized model, then a width-true OLMoE layer
    python -m benchmarks.train_step --presets=demo --tokens=4096
    python -m benchmarks.train_step --presets olmoe_1layer --dtype bfloat16 --gmm-impls pallas ragged_dot \
        --routing-impl pallas                            # GPU/TPU: kernels compared in a real train step

Soft mode always computes k_pre slots (static shapes, ε past k); hard mode computes k slots, so its cost falls
with k. Reports per-k step times and the soft/hard ratio.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import machine, median_ms
from phds_jax import models
from phds_jax.models import router
from phds_jax.training import observe, step as step_lib

PRESETS = {
    "demo": dict(model_type="olmoe", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                 head_dim=32, num_experts=16, k_pre=4, moe_ffn=64, qk_norm="full"),
    # OLMoE-1B-7B widths (d 2048, 64 experts of ffn 1024, 16 heads) with one layer and a small vocabulary.
    "olmoe_1layer": dict(model_type="olmoe", vocab_size=1024, hidden_size=2048, num_layers=1, num_heads=16,
                         num_kv_heads=16, head_dim=128, num_experts=64, k_pre=8, moe_ffn=1024, qk_norm="full"),
}


def batch(cfg, rows: int, seq: int):
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (1, rows, seq + 1))
  return dict(tokens=jnp.asarray(tok[..., :-1], jnp.int32), targets=jnp.asarray(tok[..., 1:], jnp.int32),
              loss_mask=jnp.ones((1, rows, seq)), segment_ids=jnp.ones((1, rows, seq), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, rows, seq)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", nargs="+", default=["demo", "olmoe_1layer"])
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--gmm-impls", nargs="+", default=["auto"], help="grouped-matmul impls to compare")
  parser.add_argument("--routing-impl", default="jax", choices=("jax", "pallas"))
  args = parser.parse_args()
  peak = observe.peak_tflops()
  print(f"# {machine()} | peak {peak or 'unknown'} TFLOP/s per device")
  for name, impl in [(n, i) for n in args.presets for i in args.gmm_impls]:
    cfg = models.ModelConfig(**PRESETS[name], dtype=args.dtype, param_dtype="float32", gmm_impl=impl,
                             routing_impl=args.routing_impl)
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-4)
    data = batch(cfg, args.tokens // args.seq_len, args.seq_len)
    print(f"\n## {name}: d={cfg.hidden_size} E={cfg.num_experts} k_pre={cfg.k_pre} layers={cfg.num_layers} "
          f"tokens/step={args.tokens} dtype={args.dtype} gmm={impl} routing={args.routing_impl}")
    print(f"{'k':>3} {'mode':>5} {'ms/step':>9} {'tok/s':>9} {'MFU':>7} {'soft/hard':>10}")
    for k in sorted({1, cfg.k_pre // 2, cfg.k_pre}):
      times = {}
      for mode in ("hard", "soft"):
        fn = jax.jit(step_lib.make_train_step(cfg, (k,), tx, mode=mode))
        state = step_lib.init_state(params, tx)
        idx = jnp.zeros((1,), jnp.int32)
        times[mode] = median_ms(lambda: fn(state, data, idx)[1]["loss"], repeats=3, warmup=1)
        slots = router.num_slots(k, cfg.k_pre, mode)
        flops = observe.train_flops_per_token(cfg, args.seq_len, slots) * args.tokens
        tok_s = args.tokens / (times[mode] / 1e3)
        mfu = f"{100 * flops / (times[mode] / 1e3) / (peak * 1e12):.1f}%" if peak else "-"
        ratio = f"{times['soft'] / times['hard']:.2f}" if mode == "soft" else ""
        print(f"{k:>3} {mode:>5} {times[mode]:>9.1f} {tok_s:>9.0f} {mfu:>7} {ratio:>10}")


if __name__ == "__main__":
  main()
