r"""One MoE layer forward (hard mode) at k = 1..k_pre: does time fall with k?

    python benchmarks/moe_layer.py                      # CPU: OLMoE layout scaled down (d 512, ffn 256)
    python benchmarks/moe_layer.py --preset=olmoe       # true OLMoE width: d 2048, 64 experts, ffn 1024
    python benchmarks/moe_layer.py --preset=qwen        # Qwen1.5-MoE: 60 experts, ffn 1408, shared expert
    python benchmarks/moe_layer.py --preset=olmoe --dtype bfloat16 --impls pallas ragged_dot \
        --routing-impl pallas --tokens 1 16384                           # GPU: decode step and prefill

Prints t(k)/t(k_pre) beside k/k_pre for each gmm implementation, all measured in one run (the target on
GPU/TPU: t(k)/t(k_pre) <= k/k_pre + 0.10; the "excess" column says by how much each misses it). An
implementation that fails at some k (OOM, compile error, unavailable here) prints "n/a (reason)" there; the
rest stands. At small token counts it also prints the weight-read floor: the bytes of the expert weights the
step must read (distinct experts hit x expert size, plus router and shared
expert) over the memory bandwidth measured in the same run with a large copy.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import NA, attempt, cell, failures, machine, median_ms, ratio
from phds_jax import models
from phds_jax.kernels import ROUTING_IMPLS
from phds_jax.models.moe import MoeBlock

PRESETS = {
    "cpu": dict(hidden_size=512, num_experts=64, k_pre=8, moe_ffn=256),
    "olmoe": dict(hidden_size=2048, num_experts=64, k_pre=8, moe_ffn=1024),
    "qwen": dict(model_type="qwen2_moe", hidden_size=2048, num_experts=60, k_pre=4, moe_ffn=1408,
                 shared_ffn=5632, qkv_bias=True),
    "tiny": dict(hidden_size=64, num_experts=8, k_pre=4, moe_ffn=32),  # smoke tests
}


def layer_times(cfg: models.ModelConfig, tokens: int, impls: list[str]) -> dict[str, list[float | NA]]:
  """{impl: [ms at k=1..k_pre]}, an NA where that implementation fails at that k."""
  x = jax.random.normal(jax.random.PRNGKey(0), (1, tokens, cfg.hidden_size), cfg.compute_dtype)
  params = MoeBlock(cfg).init(jax.random.PRNGKey(1), x[:, :8], k=1, mode="hard")["params"]
  out = {}
  for impl in impls:
    block = MoeBlock(cfg.replace(gmm_impl=impl))
    fwd = jax.jit(lambda p, x, k, block=block: block.apply({"params": p}, x, k=k, mode="hard")[0], static_argnums=2)
    out[impl] = [attempt(median_ms, fwd, params, x, k, repeats=3, warmup=1) for k in range(1, cfg.k_pre + 1)]
  return out


def memory_bandwidth_gbps(megabytes: int = 512) -> float:
  """Achieved bandwidth of a large elementwise op (reads and writes every byte once), GB/s."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  ms = median_ms(jax.jit(lambda a: a * 2.0), x, repeats=5, warmup=1)
  return 2 * x.nbytes / (ms * 1e-3) / 1e9


def weight_floor_ms(cfg: models.ModelConfig, tokens: int, k: int, gbps: float) -> float:
  """Lower bound of a decode-size step: read every expert hit at least once (at most min(E, tokens*k))."""
  itemsize = jnp.dtype(cfg.param_dtype).itemsize
  expert = 3 * cfg.hidden_size * cfg.moe_ffn
  fixed = cfg.hidden_size * cfg.num_experts + 3 * cfg.hidden_size * cfg.shared_ffn
  weight_bytes = (min(cfg.num_experts, tokens * k) * expert + fixed) * itemsize
  return weight_bytes / (gbps * 1e9) * 1e3


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--tokens", type=int, nargs="+", default=[2048])
  parser.add_argument("--impls", nargs="+", default=["jax"],
                      help="gmm implementations (auto, tokamax, pallas, jax, ragged_dot); ragged_dot is dense "
                           "over experts on CPU (very slow there)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--routing-impl", default="jax", choices=ROUTING_IMPLS,
                      help="router/permutation kernels (pallas: Triton on GPU, the interpreter on CPU)")
  args = parser.parse_args(argv)
  preset = dict(PRESETS[args.preset])
  cfg = models.ModelConfig(**{**dict(model_type="olmoe", vocab_size=8, num_layers=1, num_heads=1,
                                      num_kv_heads=1, head_dim=2), **preset},
                           dtype=args.dtype, param_dtype=args.dtype, routing_impl=args.routing_impl)
  print(f"# {machine('tokamax')}")
  print(f"# MoE layer forward, hard mode, preset={args.preset} d={cfg.hidden_size} E={cfg.num_experts} "
        f"ffn={cfg.moe_ffn} shared={cfg.shared_ffn} dtype={args.dtype} routing={args.routing_impl}")
  gbps = memory_bandwidth_gbps() if min(args.tokens) * cfg.k_pre < 4 * cfg.num_experts else None
  if gbps:
    print(f"# measured memory bandwidth: {gbps:.0f} GB/s (elementwise copy of 512 MiB)")
  for tokens in args.tokens:
    times = layer_times(cfg, tokens, args.impls)
    show_floor = gbps is not None and tokens * cfg.k_pre < 4 * cfg.num_experts
    header = " ".join(f"{impl + ' ms':>14} {'t/t_pre':>8} {'excess':>8}" for impl in args.impls)
    header += f" {'floor ms':>9}" if show_floor else ""
    print(f"\ntokens={tokens}\n{'k':>3} {'k/k_pre':>8} {header}")
    for i in range(cfg.k_pre):
      share = (i + 1) / cfg.k_pre
      cols = []
      for impl in args.impls:
        rel = ratio(times[impl][i], times[impl][-1])
        excess = rel if isinstance(rel, NA) else rel - share - 0.10  # > 0: misses t/t_pre <= k/k_pre + 0.10
        cols.append(f"{cell(times[impl][i], 14, '.3f')} {cell(rel, 8)} {cell(excess, 8, '+.2f')}")
      line = " ".join(cols) + (f" {weight_floor_ms(cfg, tokens, i + 1, gbps):>9.3f}" if show_floor else "")
      print(f"{i + 1:>3} {share:>8.2f} {line}")
    for impl in args.impls:
      for note in failures({f"{impl} k={i + 1}": t for i, t in enumerate(times[impl])}):
        print(f"    {note}")


if __name__ == "__main__":
  main()
