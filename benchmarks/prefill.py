r"""Whole-model prefill (a forward over the prompt, logits at every position) at each k: phds_jax per grouped-matmul
and attention implementation beside HF transformers + PyTorch on the same architecture, in one run.

    python -m benchmarks.prefill                                   # CPU: 4-layer OLMoE layout, 4 x 256 tokens
    python -m benchmarks.prefill --preset olmoe --dtype bfloat16 --batch 1 --seq_len 4096 \
        --gmm-impls auto pallas tokamax ragged_dot --attention-impls xla cudnn         # GPU: OLMoE-1B-7B widths

Columns per k: ms, MFU (forward FLOPs = 2 x active params + attention, where the device's peak is known),
t(k)/t(k_pre) beside k/k_pre, and HF's ms. Targets on H100/H200 (docs/benchmarks.md): MFU >= 40% at k=8 for
4096 tokens. A column that fails (OOM, compile error, unavailable kernel or package) prints "n/a (reason)".
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hf_torch
from benchmarks.common import NA, attempt, cell, failures, machine, median_ms, ratio
from phds_jax import models
from phds_jax.kernels import ROUTING_IMPLS
from phds_jax.training import observe

PRESETS = {
    "tiny": dict(model_type="olmoe", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=16, num_experts=8, k_pre=4, moe_ffn=32, qk_norm="full"),  # smoke tests
    # The vs_transformers layout: what a CPU can run in seconds.
    "cpu": dict(model_type="olmoe", vocab_size=4096, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8,
                head_dim=64, num_experts=32, k_pre=8, moe_ffn=256, qk_norm="full"),
    # OLMoE-1B-7B: 16 layers, d 2048, 16 heads, 64 experts of ffn 1024, top-8.
    "olmoe": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16,
                  num_kv_heads=16, head_dim=128, num_experts=64, k_pre=8, moe_ffn=1024, qk_norm="full"),
}


def forward_flops(cfg: models.ModelConfig, seq_len: int, k: int) -> float:
  """Forward FLOPs per token: a third of the train-step count (6 x params + 3 x attention -> 2x and 1x)."""
  return observe.train_flops_per_token(cfg, seq_len, k) / 3


def ours_ms(cfg: models.ModelConfig, params, tokens: jax.Array, k: int, repeats: int) -> float:
  forward = models.jit_forward(cfg)
  return median_ms(lambda: forward(params, tokens, k=k)[0], repeats=repeats, warmup=1)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--dtype", default="float32", help="compute and weight dtype (inference)")
  parser.add_argument("--ks", type=int, nargs="+", help="top-k levels (default k_pre down to 1)")
  parser.add_argument("--gmm-impls", nargs="+", default=["auto"])
  parser.add_argument("--attention-impls", nargs="+", default=["auto"], choices=("auto", "xla", "cudnn"))
  parser.add_argument("--routing-impl", default="jax", choices=ROUTING_IMPLS)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-hf", action="store_true", help="skip the transformers + PyTorch column")
  args = parser.parse_args(argv)

  base = models.ModelConfig(**PRESETS[args.preset], dtype=args.dtype, param_dtype=args.dtype,
                            routing_impl=args.routing_impl)
  ks = args.ks or list(range(base.k_pre, 0, -1))
  peak = observe.peak_tflops()
  tokens_np = np.random.default_rng(0).integers(0, base.vocab_size, (args.batch, args.seq_len))
  tokens = jnp.asarray(tokens_np, jnp.int32)
  n_tok = args.batch * args.seq_len
  print(f"# {machine('tokamax', 'torch', 'transformers')} | peak {peak or 'unknown'} TFLOP/s per device")
  print(f"# prefill {args.preset}: {base.num_layers} layers d={base.hidden_size} E={base.num_experts} "
        f"k_pre={base.k_pre} | {args.batch} x {args.seq_len} tokens | {args.dtype} | routing={args.routing_impl}")

  params = models.init_params(base, jax.random.PRNGKey(0))
  columns: dict[str, dict[int, float | NA]] = {}
  for gmm_impl in args.gmm_impls:
    for attn_impl in args.attention_impls:
      cfg = base.replace(gmm_impl=gmm_impl, attention_impl=attn_impl)
      columns[f"{gmm_impl}/{attn_impl}"] = {k: attempt(ours_ms, cfg, params, tokens, k, args.repeats) for k in ks}
  del params
  hf_model = NA("skipped", "--no-hf") if args.no_hf else attempt(hf_torch.build, base, args.dtype)
  columns["HF torch"] = hf_torch.per_k(hf_model, ks, hf_torch.forward_ms, tokens_np, repeats=args.repeats)

  names = list(columns)
  head = " ".join(f"{n[:22]:>22} {'MFU%':>8} {'t/t_pre':>8}" for n in names)
  print(f"{'k':>3} {'k/k_pre':>8} {head}  (ms; gmm/attention impl)")
  for k in ks:
    cols = []
    for name in names:
      t = columns[name][k]
      mfu = ratio(100 * forward_flops(base, args.seq_len, k) * n_tok / 1e9 / peak, t) if peak else "-"
      cols.append(f"{cell(t, 22, '.1f')} {cell(mfu, 8, '.1f')} {cell(ratio(t, columns[name][ks[0]]), 8)}")
    print(f"{k:>3} {k / base.k_pre:>8.2f} {' '.join(cols)}", flush=True)
  for name in names:
    for note in failures({f"{name} k={k}": t for k, t in columns[name].items()}):
      print(f"    {note}")
  best = {k: min((columns[n][k] for n in names[:-1] if not isinstance(columns[n][k], NA)), default=None) for k in ks}
  if all(best[k] is not None for k in ks):
    speed = " ".join(f"k={k}: {cell(ratio(columns['HF torch'][k], best[k]), 0)}x" for k in ks)
    print(f"HF / best of ours: {speed}")


if __name__ == "__main__":
  main()
