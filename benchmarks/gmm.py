"""Grouped-matmul benchmark: our kernels vs ragged_dot vs a dense matmul of the same FLOPs, side by side.

  python benchmarks/gmm.py                 # CPU: tiled JAX loop, default shapes, fp32, ~1-2 min on 2 cores
  python benchmarks/gmm.py --full          # more shapes (slow: ragged_dot is O(G·m) on CPU)
  python benchmarks/gmm.py --dtype bfloat16 --tile-m 64 --reps 9
  python benchmarks/gmm.py --sweep olmoe   # GPU/TPU: Pallas vs ragged_dot vs dense bf16, TFLOP/s, at the
  python benchmarks/gmm.py --sweep qwen    #   model's expert shapes, tokens 16..65536, k = 1..k_pre
  python benchmarks/gmm.py --sweep olmoe --tokens 16 --ks 1 8 --scale 16 --reps 1 --check  # CPU smoke run

Columns (ms, median of --reps jitted runs after a warm-up, block_until_ready):
  jax      phds_jax.kernels.gmm(impl="jax"): loops over groups and row windows (the CPU default);
  batched  the alternative design kept here for comparison: gather every work item's lhs tile and weight,
           one batched einsum, gather rows back (autodiff for the backward);
  ragged   jax.lax.ragged_dot (dense over all groups on XLA:CPU);
  dense    one [m,k] x [k,n] matmul: the useful FLOPs at dense-matmul speed, a lower bound.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from phds_jax import kernels  # noqa: E402
from phds_jax.kernels import grouped_matmul as gm  # noqa: E402

# (label, m rows = tokens x top-k, G experts, k, n)
DEFAULT_SHAPES = [
    ("m1k G8", 1024, 8, 256, 128),
    ("m1k G32", 1024, 32, 256, 128),
    ("m1k G64", 1024, 64, 256, 128),
    ("m8k G8", 8192, 8, 256, 128),
    ("m8k G32", 8192, 32, 256, 128),
    ("m8k G64", 8192, 64, 256, 128),
    ("olmoe/4 wi", 2048, 64, 512, 512),  # OLMoE with d, F / 4: 256 tokens x top-8, D=512 -> 2F=512
    ("olmoe/4 wo", 2048, 64, 256, 512),  # F=256 -> D=512
]
FULL_SHAPES = DEFAULT_SHAPES + [
    ("m256 G64 decode", 256, 64, 256, 128),
    ("m4k G16", 4096, 16, 256, 128),
    ("m8k G128", 8192, 128, 256, 128),
    ("m16k G64", 16384, 64, 256, 128),
    ("olmoe/2 wi", 4096, 64, 1024, 1024),
]


def gmm_batched(lhs, rhs, group_sizes, tile_m):
  """Static list of (row tile, group) work items, one batched einsum over gathered tiles and weights,
  each row read back from its item. Differentiable by autodiff (gathers -> scatter-adds)."""
  m, k = lhs.shape
  num_groups, num_tiles = rhs.shape[0], -(-m // tile_m)
  b = gm.group_bounds(group_sizes, m)
  first_tile_G = b.starts_G // tile_m
  items_G = jnp.where(b.ends_G > b.starts_G, (b.ends_G - 1) // tile_m - first_tile_G + 1, 0)
  item_start_G = jnp.cumsum(items_G) - items_G
  item_I = jnp.arange(gm.num_work_items(m, num_groups, tile_m))
  group_I = jnp.minimum(jnp.searchsorted(item_start_G + items_G, item_I, side="right"), num_groups - 1)
  tile_I = jnp.clip(first_tile_G[group_I] + item_I - item_start_G[group_I], 0, num_tiles - 1)  # padding: junk
  lhs_IxTxK = jnp.pad(lhs, ((0, num_tiles * tile_m - m), (0, 0))).reshape(num_tiles, tile_m, k)[tile_I]
  out_IxTxN = jnp.einsum("itk,ikn->itn", lhs_IxTxK, rhs[group_I], preferred_element_type=jnp.float32)
  row_M = jnp.arange(m)
  group_M = jnp.minimum(jnp.searchsorted(b.ends_G, row_M, side="right"), num_groups - 1)
  item_M = item_start_G[group_M] + row_M // tile_m - first_tile_G[group_M]
  out_MxN = out_IxTxN.reshape(-1, out_IxTxN.shape[-1])[item_M * tile_m + row_M % tile_m]
  return jnp.where((row_M < b.ends_G[-1])[:, None], out_MxN, 0).astype(lhs.dtype)


def timed(fn, *args, reps: int, budget_s: float = 1.0) -> float:
  """Median wall time in ms of a jitted call after a warm-up (compile) call; calls slower than budget_s / reps
  get fewer reps (down to 1: ragged_dot's seconds-long runs dwarf the noise)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  times = [time.perf_counter() - t0]
  for _ in range(min(reps, max(1, int(budget_s / times[0]))) - 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def group_sizes_for(m: int, num_groups: int, rng: np.random.Generator, balanced: bool) -> np.ndarray:
  """Sizes summing to m: Dirichlet(1) imbalance (router-like, some near-empty experts) or equal."""
  p = np.full(num_groups, 1 / num_groups) if balanced else rng.dirichlet(np.ones(num_groups))
  sizes = np.floor(p * m).astype(np.int32)
  sizes[np.argmax(sizes)] += m - sizes.sum()
  return sizes


def bench_shape(m, num_groups, k, n, args, rng):
  dtype = jnp.dtype(args.dtype)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), dtype)
  gs = jnp.asarray(group_sizes_for(m, num_groups, rng, args.balanced))
  ladder = gm.tile_ladder(m, args.tile_m)
  # The batched design needs one tile for all groups: ~4 tiles per average group, a power of 2 in [16, 128].
  bt = args.tile_m or min(128, max(16, 1 << (max(1, m // (4 * num_groups)).bit_length() - 1)))
  fwd = {
      "jax": lambda a, b, g: kernels.gmm(a, b, g, impl="jax", tile_m=ladder[0]),
      "batched": lambda a, b, g: gmm_batched(a, b, g, bt),
      "ragged": lambda a, b, g: kernels.gmm(a, b, g, impl="ragged_dot"),
      "dense": lambda a, b, g: jnp.dot(a, b[0], preferred_element_type=jnp.float32).astype(a.dtype),
  }
  if args.check:
    ref = np.asarray(fwd["ragged"](lhs, rhs, gs).astype(jnp.float32))
    for name in ("jax", "batched"):
      err = np.abs(np.asarray(fwd[name](lhs, rhs, gs).astype(jnp.float32)) - ref).max()
      assert err < (1e-3 if dtype == jnp.float32 else 0.1), (name, err)
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  out = {}
  for name, f in fwd.items():
    if name not in args.impls:
      out[name] = (float("nan"), float("nan"))
      continue
    grad = jax.grad(lambda a, b, g, f=f: jnp.sum(f(a, b, g).astype(jnp.float32) * cot), argnums=(0, 1))
    out[name] = (timed(jax.jit(f), lhs, rhs, gs, reps=args.reps),
                 timed(jax.jit(grad), lhs, rhs, gs, reps=args.reps))
  return f"{ladder[0]}/{bt}", out


# --sweep: (experts, d_model, moe ffn, k_pre) of the target models; both projections are timed:
# wi [d -> 2 ffn] (gate and up fused) and wo [ffn -> d].
SWEEPS = {"olmoe": (64, 2048, 1024, 8), "qwen": (60, 2048, 1408, 4)}
SWEEP_TOKENS = (16, 128, 1024, 8192, 65536)


def sweep_line(impls, m, num_groups, k, n, args, rng):
  """{impl: (fwd ms, fwd+bwd ms)} for one projection; 'dense' is one [m,k]x[k,n] matmul."""
  dtype = jnp.dtype(args.dtype)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), dtype)
  gs = jnp.asarray(group_sizes_for(m, num_groups, rng, args.balanced))
  tiles = dict(tile_m=args.tile_m, tile_k=args.tile_k, tile_n=args.tile_n)
  fns = {
      "pallas": lambda a, b, g: kernels.gmm_pallas(a, b, g, **tiles),
      "ragged": lambda a, b, g: kernels.gmm(a, b, g, impl="ragged_dot"),
      "jax": lambda a, b, g: kernels.gmm(a, b, g, impl="jax"),
      "dense": lambda a, b, g: jnp.dot(a, b[0], preferred_element_type=jnp.float32).astype(a.dtype),
  }
  if args.check and "pallas" in impls:
    err = np.abs(np.asarray(fns["pallas"](lhs, rhs, gs), np.float32) - np.asarray(fns["ragged"](lhs, rhs, gs),
                                                                                 np.float32)).max()
    assert err < (1e-2 if dtype == jnp.float32 else 0.25), ("pallas vs ragged_dot", err)
  cot = jnp.asarray(rng.normal(size=(m, n)), dtype)
  out = {}
  for name in impls:
    f = fns[name]
    grad = jax.grad(lambda a, b, g, f=f: jnp.sum(f(a, b, g).astype(jnp.float32) * cot), argnums=(0, 1))
    out[name] = (timed(jax.jit(f), lhs, rhs, gs, reps=args.reps),
                 timed(jax.jit(grad), lhs, rhs, gs, reps=args.reps))
  return out


def run_sweep(args):
  """TFLOP/s per impl and the ratios the issue targets: pallas/ragged_dot and pallas/dense (>= 8k tokens)."""
  experts, d, ffn, k_pre = SWEEPS[args.sweep]
  d, ffn = d // args.scale, ffn // args.scale
  impls = args.impls.split(",") if args.impls != DEFAULT_IMPLS else ["pallas", "ragged", "dense"]
  ks = args.ks or list(range(1, k_pre + 1))
  rng = np.random.default_rng(0)
  cols = " ".join(f"{c:>8}" for c in impls)
  print(f"sweep {args.sweep}: {experts} experts, d {d}, ffn {ffn}, k_pre {k_pre}; groups Dirichlet(1) unless "
        f"--balanced; TFLOP/s (useful FLOPs = 2mkn; "
        f"fwd+bwd counts 3x)")
  print(f"{'proj':<4} {'tokens':>6} {'k':>2} {'rows':>7} | fwd {cols} {'pl/rd':>6} {'pl/dn':>6} | "
        f"fwd+bwd {cols} {'pl/rd':>6} {'pl/dn':>6}")
  for tokens in args.tokens or SWEEP_TOKENS:
    for k in ks:
      m = tokens * k
      for proj, (kk, n) in (("wi", (d, 2 * ffn)), ("wo", (ffn, d))):
        res = sweep_line(impls, m, experts, kk, n, args, rng)
        parts = []
        for mode, flops in ((0, 2 * m * kk * n), (1, 6 * m * kk * n)):
          tflops = {c: flops / (res[c][mode] * 1e-3) / 1e12 for c in impls}
          ratio = lambda a, b: tflops[a] / tflops[b] if a in tflops and b in tflops else float("nan")
          parts.append(" ".join(f"{tflops[c]:8.3g}" for c in impls)
                       + f" {ratio('pallas', 'ragged'):6.2f} {ratio('pallas', 'dense'):6.2f}")
        print(f"{proj:<4} {tokens:>6} {k:>2} {m:>7} | fwd {parts[0]} | fwd+bwd {parts[1]}", flush=True)


DEFAULT_IMPLS = "jax,batched,ragged,dense"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--full", action="store_true", help="more shapes (slower)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--tile-m", type=int, default=None,
                      help="jax: largest window (default 128); batched: its one tile (default: shape heuristic)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--balanced", action="store_true", help="equal group sizes instead of Dirichlet(1)")
  parser.add_argument("--impls", default=DEFAULT_IMPLS,
                      help="columns to time (others: nan); --sweep: pallas,ragged,dense (also: jax)")
  parser.add_argument("--check", action="store_true", help="also check outputs against ragged_dot")
  parser.add_argument("--sweep", choices=sorted(SWEEPS), help="model-shape sweep for GPU/TPU (see above)")
  parser.add_argument("--tokens", type=int, nargs="+", help=f"--sweep token counts (default {SWEEP_TOKENS})")
  parser.add_argument("--ks", type=int, nargs="+", help="--sweep top-k values (default 1..k_pre)")
  parser.add_argument("--scale", type=int, default=1, help="--sweep: divide d and ffn (CPU smoke runs)")
  parser.add_argument("--tile-k", type=int, default=None, help="--sweep: pallas tile_k (default per backend)")
  parser.add_argument("--tile-n", type=int, default=None, help="--sweep: pallas tile_n (default per backend)")
  args = parser.parse_args()

  print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} cpus | python {platform.python_version()}")
  print(f"jax {jax.__version__} | backend {jax.default_backend()} | {jax.devices()[0].device_kind} | "
        f"dtype {args.dtype} | groups {'balanced' if args.balanced else 'Dirichlet(1)'} | median of {args.reps}")
  if args.sweep:
    return run_sweep(args)
  args.impls = args.impls.split(",")
  cols = ("jax", "batched", "ragged", "dense")
  head = " ".join(f"{c:>8}" for c in cols) + f" {'rd/jax':>7} {'jax/dn':>7}"
  print(f"{'shape':<16} {'m':>6} {'G':>4} {'k->n':>9} {'tiles':>7} | fwd ms {head} | fwd+bwd ms {head}")
  rng = np.random.default_rng(0)
  for label, m, num_groups, k, n in (FULL_SHAPES if args.full else DEFAULT_SHAPES):
    tiles, res = bench_shape(m, num_groups, k, n, args, rng)
    parts = []
    for mode in (0, 1):
      t = {c: res[c][mode] for c in cols}
      parts.append(" ".join(f"{t[c]:8.2f}" for c in cols)
                   + f" {t['ragged'] / t['jax']:7.1f}x {t['jax'] / t['dense']:6.1f}x")
    print(f"{label:<16} {m:>6} {num_groups:>4} {f'{k}->{n}':>9} {tiles:>7} | fwd ms {parts[0]} | "
          f"fwd+bwd ms {parts[1]}", flush=True)


if __name__ == "__main__":
  main()
