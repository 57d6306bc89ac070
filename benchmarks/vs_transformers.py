r"""Whole-model forward: phds_jax vs transformers + PyTorch, same weights, same inputs, same run.

    python -m benchmarks.vs_transformers                   # CPU-sized OLMoE layout
    python -m benchmarks.vs_transformers --family=qwen2_moe --batch=4 --seq_len=256

Measures every k in --ks for both frameworks (the PyTorch model is re-dialled by setting each router's top_k),
checks that the two agree on the logits before timing anything, and interleaves the two frameworks' repeats
(jax, torch, jax, torch, ...) so that load from other jobs on the machine hits both alike. Also prints the
FLOPs of each forward, the GFLOP/s each framework reaches, and a dense fp32 matmul's GFLOP/s measured in the
same run: the ceiling that bounds how far ahead of PyTorch a forward can get on this CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks.common import machine
from benchmarks.hf_torch import set_k as set_torch_k
from phds_jax import hf, models
from phds_jax.training import observe

SIZES = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, num_experts=32, num_experts_per_tok=8)


def hf_config(family: str):
  if family == "olmoe":
    return transformers.OlmoeConfig(**SIZES, intermediate_size=256)
  if family == "qwen2_moe":
    return transformers.Qwen2MoeConfig(**{**SIZES, "num_experts_per_tok": 4}, moe_intermediate_size=256,
                                       shared_expert_intermediate_size=1024, intermediate_size=1024)
  if family == "qwen3_moe":
    return transformers.Qwen3MoeConfig(**SIZES, moe_intermediate_size=256, norm_topk_prob=True)
  raise ValueError(family)


def interleaved_ms(jax_fn, torch_fn, repeats: int) -> dict[str, tuple[float, float]]:
  """{framework: (median wall ms, median process CPU ms)}, timed alternately after one warm-up call each.
  Single-threaded, the CPU time is the work itself: other jobs on the machine barely move it."""
  times = {"jax": [], "torch": []}
  with torch.no_grad():
    jax.block_until_ready(jax_fn())
    torch_fn()
    for _ in range(repeats):
      for name, fn in (("jax", lambda: jax.block_until_ready(jax_fn())), ("torch", torch_fn)):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        times[name].append((time.perf_counter() - start, time.process_time() - cpu))
  return {name: tuple(1e3 * float(x) for x in np.median(np.asarray(t), axis=0)) for name, t in times.items()}


def dense_gflops(m: int, k: int, n: int, repeats: int = 5, cpu_time: bool = False) -> float:
  """GFLOP/s of one fp32 [m,k] x [k,n] matmul under XLA: the CPU's practical ceiling for these widths
  (per CPU-second with `cpu_time`, the single-threaded measure)."""
  a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  clock = time.process_time if cpu_time else time.perf_counter
  times = []
  for _ in range(repeats):
    start = clock()
    jax.block_until_ready(f(a, b))
    times.append(clock() - start)
  return 2 * m * k * n / float(np.median(times)) / 1e9


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="olmoe", choices=["olmoe", "qwen2_moe", "qwen3_moe"])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--ks", type=int, nargs="+", help="top-k levels (default k_pre, k_pre/2, 2, 1)")
  parser.add_argument("--low_k", type=int, default=2, help="the k whose time is compared with k_pre's")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--layers", type=int, default=SIZES["num_hidden_layers"])
  parser.add_argument("--threads", type=int, default=0,
                      help="1: both frameworks single-threaded (per-core efficiency; far steadier than the "
                           "default when other jobs share the machine). Must precede jax's first use.")
  args = parser.parse_args(argv)
  if args.threads == 1:
    bridge = getattr(jax._src, "xla_bridge", None)  # noqa: SLF001 - private, hence the getattr
    initialized = getattr(bridge, "backends_are_initialized", lambda: False)
    if initialized():
      raise RuntimeError("--threads 1 must be set before jax initialises its CPU backend")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               "intra_op_parallelism_threads=1").strip()
    torch.set_num_threads(1)
  elif args.threads:
    raise ValueError("--threads: 0 (defaults) or 1")

  torch.manual_seed(0)
  config = hf_config(args.family)
  config.num_hidden_layers = args.layers
  hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    cfg, params = hf.load(tmp)
  k_pre = cfg.k_pre
  ks = args.ks or sorted({k_pre, max(1, k_pre // 2), min(args.low_k, k_pre), 1}, reverse=True)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len))
  tokens_j, tokens_t = jnp.asarray(tokens, jnp.int32), torch.as_tensor(tokens)
  forward = models.jit_forward(cfg)
  n_tok = args.batch * args.seq_len

  print(f"# {machine()} | torch {torch.__version__} ({torch.get_num_threads()} threads) | "
        f"transformers {transformers.__version__}")
  print(f"# {args.family}: {cfg.num_layers} layers, d={cfg.hidden_size}, E={cfg.num_experts}, k_pre={k_pre}, "
        f"batch={args.batch} x seq={args.seq_len}, fp32; repeats interleaved jax/torch, median of {args.repeats}"
        f"{'; both single-threaded' if args.threads == 1 else ''}")
  clock = "CPU" if args.threads == 1 else "wall"  # single-threaded: process CPU time, steady under load
  print(f"{'k':>3} {'jax ms':>9} {'torch ms':>9} {'torch/jax':>10} {'GFLOP':>7} {'jax GF/s':>9} {'torch GF/s':>11} "
        f"{'max |dlogit|':>13} {'(wall jax / torch)':>20}   [ms = {clock} time]")
  rows = {}
  for k in ks:
    set_torch_k(hf_model, k)
    with torch.no_grad():
      ref = hf_model(tokens_t).logits.numpy()
    ours = np.asarray(forward(params, tokens_j, k=k)[0])
    diff = float(np.abs(ours - ref).max())
    t = interleaved_ms(lambda: forward(params, tokens_j, k=k)[0], lambda: hf_model(tokens_t), args.repeats)
    which = 1 if args.threads == 1 else 0
    jax_t, torch_t = t["jax"][which], t["torch"][which]
    gflop = observe.train_flops_per_token(cfg, args.seq_len, k) / 3 * n_tok / 1e9  # forward: 2 x active params
    rows[k] = (jax_t, torch_t, gflop)
    wall = f"{t['jax'][0]:.0f} / {t['torch'][0]:.0f}"
    print(f"{k:>3} {jax_t:>9.1f} {torch_t:>9.1f} {torch_t / jax_t:>10.2f} {gflop:>7.1f} {gflop / jax_t * 1e3:>9.1f} "
          f"{gflop / torch_t * 1e3:>11.1f} {diff:>13.2e} {wall:>20}", flush=True)
  if k_pre in rows and args.low_k in rows:
    (jp, tp, fp), (jl, tl, fl) = rows[k_pre], rows[args.low_k]
    print(f"time at k={args.low_k} / time at k={k_pre}: jax {jl / jp:.2f}, torch {tl / tp:.2f} "
          f"(expert share {args.low_k / k_pre:.2f}, FLOP share {fl / fp:.2f})")
  rows_mm = 8 * n_tok  # as many rows as the k=8 expert matmuls
  ceiling = dense_gflops(rows_mm, cfg.hidden_size, cfg.hidden_size, cpu_time=args.threads == 1)
  if k_pre in rows:
    print(f"dense fp32 matmul [{rows_mm}x{cfg.hidden_size}]x[{cfg.hidden_size}x{cfg.hidden_size}] in this run: "
          f"{ceiling:.1f} GFLOP/s ({clock} time); 2x torch at k={k_pre} would need "
          f"{2 * rows[k_pre][2] / rows[k_pre][1] * 1e3:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
