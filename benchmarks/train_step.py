r"""Train-step throughput: tokens/s and MFU, soft (PHDS training) vs hard routing, measured in one run.

    python -m benchmarks.train_step                      # demo-sized model, then a width-true OLMoE layer
    python -m benchmarks.train_step --presets=demo --tokens=4096
    python -m benchmarks.train_step --presets olmoe_1layer --dtype bfloat16 --gmm-impls pallas ragged_dot \
        --routing-impl pallas                            # GPU/TPU: kernels compared in a real train step

Soft mode always computes k_pre slots (static shapes, ε past k); hard mode computes k slots, so its cost falls
with k. Reports per-k step times, the soft/hard ratio, MFU where the device's peak is known, HF transformers +
PyTorch's train step on the same architecture (hard routing at k, AdamW, autocast for bf16) beside ours, and
the training state's memory per device (training/memory.py: fp32 master weights, grads, AdamW moments) for
`--mesh`. Mixed precision as the field does it: `--dtype bfloat16` computes in bf16 over fp32 master weights.
A configuration that fails (OOM, compile error, unavailable kernel) prints "n/a (reason)" in its cell.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import hf_torch
from benchmarks.common import NA, attempt, cell, failures, machine, median_ms, ratio
from phds_jax import models
from phds_jax.kernels import ROUTING_IMPLS
from phds_jax.models import router
from phds_jax.training import memory, observe, step as step_lib

PRESETS = {
    "demo": dict(model_type="olmoe", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                 head_dim=32, num_experts=16, k_pre=4, moe_ffn=64, qk_norm="full"),
    # OLMoE-1B-7B widths (d 2048, 64 experts of ffn 1024, 16 heads) with one layer and a small vocabulary.
    "olmoe_1layer": dict(model_type="olmoe", vocab_size=1024, hidden_size=2048, num_layers=1, num_heads=16,
                         num_kv_heads=16, head_dim=128, num_experts=64, k_pre=8, moe_ffn=1024, qk_norm="full"),
    "tiny": dict(model_type="olmoe", vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=4,
                 head_dim=16, num_experts=8, k_pre=4, moe_ffn=32, qk_norm="full"),  # smoke tests
}


def batch(cfg, rows: int, seq: int):
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (1, rows, seq + 1))
  return dict(tokens=jnp.asarray(tok[..., :-1], jnp.int32), targets=jnp.asarray(tok[..., 1:], jnp.int32),
              loss_mask=jnp.ones((1, rows, seq)), segment_ids=jnp.ones((1, rows, seq), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, rows, seq)))


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=8,expert=2' -> {'fsdp': 8, 'expert': 2}."""
  return {k: int(v) for k, v in (part.split("=") for part in text.split(",") if part)}


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", nargs="+", default=["demo", "olmoe_1layer"])
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--dtype", default="float32", help="compute dtype; master weights and AdamW stay fp32")
  parser.add_argument("--gmm-impls", nargs="+", default=["auto"], help="grouped-matmul impls to compare")
  parser.add_argument("--routing-impl", default="jax", choices=ROUTING_IMPLS)
  parser.add_argument("--attention-impl", default="auto", choices=("auto", "xla", "cudnn"))
  parser.add_argument("--ks", type=int, nargs="+", help="top-k levels (default 1, k_pre/2, k_pre)")
  parser.add_argument("--no-hf", action="store_true", help="skip the transformers + PyTorch column")
  parser.add_argument("--mesh", type=parse_mesh, default={},
                      help="mesh for the memory estimate, e.g. fsdp=8 (default: one device)")
  args = parser.parse_args(argv)
  peak = observe.peak_tflops()
  print(f"# {machine('tokamax', 'torch', 'transformers')} | peak {peak or 'unknown'} TFLOP/s per device")
  for name in args.presets:
    base = models.ModelConfig(**PRESETS[name], dtype=args.dtype, param_dtype="float32",
                              routing_impl=args.routing_impl, attention_impl=args.attention_impl)
    mem = attempt(memory.state_bytes_per_device, base, args.mesh)
    print(f"\n## {name}: d={base.hidden_size} E={base.num_experts} k_pre={base.k_pre} layers={base.num_layers} "
          f"tokens/step={args.tokens} dtype={args.dtype} routing={args.routing_impl} attention={args.attention_impl}")
    print(f"# memory: {mem if isinstance(mem, NA) else mem.render()}")
    rows, seq = args.tokens // args.seq_len, args.seq_len
    data = batch(base, rows, seq)
    ks = args.ks or sorted({1, base.k_pre // 2, base.k_pre})
    hf_model = NA("skipped", "--no-hf") if args.no_hf else attempt(hf_torch.build, base)
    hf_tokens = np.random.default_rng(0).integers(0, base.vocab_size, (rows, seq))
    hf_ms = hf_torch.per_k(hf_model, ks, hf_torch.train_step_ms, hf_tokens, dtype=args.dtype)
    params = models.init_params(base, jax.random.PRNGKey(0))
    tx = optax.adamw(1e-4)
    for impl in args.gmm_impls:
      cfg = base.replace(gmm_impl=impl)
      print(f"# gmm={impl}")
      print(f"{'k':>3} {'mode':>5} {'ms/step':>14} {'tok/s':>14} {'MFU':>14} {'soft/hard':>10} {'HF ms':>14} "
            f"{'HF/ours':>14}")
      for k in ks:
        times = {}
        for mode in ("hard", "soft"):
          fn = jax.jit(step_lib.make_train_step(cfg, (k,), tx, mode=mode))
          idx = jnp.zeros((1,), jnp.int32)
          state = step_lib.init_state(params, tx)
          times[mode] = attempt(median_ms, lambda fn=fn, state=state: fn(state, data, idx)[1]["loss"], repeats=3,
                                warmup=1)
          slots = router.num_slots(k, cfg.k_pre, mode)
          flops = observe.train_flops_per_token(cfg, seq, slots) * args.tokens
          tok_s = ratio(args.tokens * 1e3, times[mode])
          mfu = ratio(100 * flops / 1e9 / peak, times[mode]) if peak else "-"
          soft_hard = f"{cell(ratio(times['soft'], times['hard']), 10)}" if mode == "soft" else " " * 10
          hf = (f"{cell(hf_ms[k], 14, '.1f')} {cell(ratio(hf_ms[k], times[mode]), 14)}" if mode == "hard" else "")
          print(f"{k:>3} {mode:>5} {cell(times[mode], 14, '.1f')} {cell(tok_s, 14, '.0f')} {cell(mfu, 14, '.1f')} "
                f"{soft_hard} {hf}", flush=True)
        for note in failures({f"k={k} {m}": t for m, t in times.items()} | {f"HF k={k}": hf_ms[k]}):
          print(f"    {note}")


if __name__ == "__main__":
  main()
