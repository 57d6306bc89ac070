"""Grouped-matmul benchmark: our kernels vs ragged_dot vs a dense matmul of the same FLOPs, side by side.

  python benchmarks/gmm.py                 # CPU: tiled JAX loop, default shapes, fp32, ~1-2 min on 2 cores
  python benchmarks/gmm.py --full          # more shapes (slow: ragged_dot is O(G·m) on CPU)
  python benchmarks/gmm.py --dtype bfloat16 --tile-m 64 --reps 9
  python benchmarks/gmm.py --sweep olmoe   # GPU/TPU: Pallas vs tokamax vs ragged_dot vs dense bf16, TFLOP/s,
  python benchmarks/gmm.py --sweep qwen    #   at the model's expert shapes, tokens 16..65536, k = 1..k_pre
  python benchmarks/gmm.py --sweep olmoe --tokens 16 --ks 1 8 --scale 16 --reps 1 --check  # CPU smoke run

A column that fails (out of memory, compile error, an implementation that is unavailable here, e.g. tokamax
without jax >= 0.11) prints "n/a (reason)" and the line goes on; the full errors follow the line.

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
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import NA, attempt, cell, failures, machine, ratio  # noqa: E402
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


def _fwd_and_grad(f, lhs, rhs, gs, cot, reps: int) -> tuple:
  """(fwd ms, fwd+bwd ms), each an NA if it fails: the backward can fail (e.g. OOM) where the forward runs."""
  grad = jax.grad(lambda a, b, g: jnp.sum(f(a, b, g).astype(jnp.float32) * cot), argnums=(0, 1))
  return (attempt(timed, jax.jit(f), lhs, rhs, gs, reps=reps), attempt(timed, jax.jit(grad), lhs, rhs, gs, reps=reps))


def _check(fns, names, lhs, rhs, gs, tol) -> list[str]:
  """Max |impl - ragged_dot| for each name; a failing implementation is reported, not asserted."""
  ref = attempt(lambda: np.asarray(fns["ragged"](lhs, rhs, gs), np.float32))
  notes = []
  for name in names:
    out = attempt(lambda: np.asarray(fns[name](lhs, rhs, gs), np.float32))
    if isinstance(out, NA) or isinstance(ref, NA):
      continue  # the timing columns report why
    err = float(np.abs(out - ref).max())
    assert err < tol, (f"{name} vs ragged_dot", err)
  return notes


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
  notes = _check(fwd, ("jax", "batched"), lhs, rhs, gs, 1e-3 if dtype == jnp.float32 else 0.1) if args.check else []
  cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  out = {}
  for name, f in fwd.items():
    if name not in args.impls:
      out[name] = (NA("skipped", "not in --impls"),) * 2
      continue
    out[name] = _fwd_and_grad(f, lhs, rhs, gs, cot, args.reps)
  return f"{ladder[0]}/{bt}", out, notes


# --sweep: (experts, d_model, moe ffn, k_pre) of the target models; both projections are timed:
# wi [d -> 2 ffn] (gate and up fused) and wo [ffn -> d].
SWEEPS = {"olmoe": (64, 2048, 1024, 8), "qwen": (60, 2048, 1408, 4)}
SWEEP_TOKENS = (16, 128, 1024, 8192, 65536)


def sweep_line(impls, m, num_groups, k, n, args, rng):
  """{impl: (fwd ms, fwd+bwd ms)} for one projection (NA where a column fails); 'dense' is one [m,k]x[k,n]
  matmul of the same useful FLOPs."""
  dtype = jnp.dtype(args.dtype)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), dtype)
  gs = jnp.asarray(group_sizes_for(m, num_groups, rng, args.balanced))
  tiles = dict(tile_m=args.tile_m, tile_k=args.tile_k, tile_n=args.tile_n)
  fns = {
      "pallas": lambda a, b, g: kernels.gmm_pallas(a, b, g, **tiles),
      "tokamax": lambda a, b, g: kernels.gmm(a, b, g, impl="tokamax"),
      "ragged": lambda a, b, g: kernels.gmm(a, b, g, impl="ragged_dot"),
      "jax": lambda a, b, g: kernels.gmm(a, b, g, impl="jax"),
      "auto": lambda a, b, g: kernels.gmm(a, b, g, impl="auto"),
      "dense": lambda a, b, g: jnp.dot(a, b[0], preferred_element_type=jnp.float32).astype(a.dtype),
  }
  notes = []
  if args.check:
    notes = _check(fns, [i for i in impls if i not in ("ragged", "dense")], lhs, rhs, gs,
                   1e-2 if dtype == jnp.float32 else 0.25)
  cot = jnp.asarray(rng.normal(size=(m, n)), dtype)
  return {name: _fwd_and_grad(fns[name], lhs, rhs, gs, cot, args.reps) for name in impls}, notes


SWEEP_IMPLS = ("pallas", "tokamax", "ragged", "dense")


def run_sweep(args):
  """TFLOP/s per impl and each kernel's ratio to the dense matmul (target: fwd >= 0.75, fwd+bwd >= 0.8 at
  >= 8k tokens), failing columns as n/a."""
  experts, d, ffn, k_pre = SWEEPS[args.sweep]
  d, ffn = d // args.scale, ffn // args.scale
  impls = args.impls.split(",") if args.impls != DEFAULT_IMPLS else list(SWEEP_IMPLS)
  kernels_ = [i for i in impls if i != "dense"]
  ks = args.ks or list(range(1, k_pre + 1))
  rng = np.random.default_rng(0)
  cols = " ".join(f"{c:>12}" for c in impls)
  vs_dense = " ".join(f"{c[:6] + '/dn':>12}" for c in kernels_) if "dense" in impls else ""
  print(f"sweep {args.sweep}: {experts} experts, d {d}, ffn {ffn}, k_pre {k_pre}; groups Dirichlet(1) unless "
        f"--balanced; TFLOP/s (useful FLOPs = 2mkn; fwd+bwd counts 3x)")
  print(f"{'proj':<4} {'tokens':>6} {'k':>2} {'rows':>7} | fwd {cols} {vs_dense} | fwd+bwd {cols} {vs_dense}")
  for tokens in args.tokens or SWEEP_TOKENS:
    for k in ks:
      m = tokens * k
      for proj, (kk, n) in (("wi", (d, 2 * ffn)), ("wo", (ffn, d))):
        res, notes = sweep_line(impls, m, experts, kk, n, args, rng)
        parts = []
        for mode, flops in ((0, 2 * m * kk * n), (1, 6 * m * kk * n)):
          tflops = {c: ratio(flops / 1e9, res[c][mode]) for c in impls}  # FLOP / ms / 1e9 = TFLOP/s
          line = " ".join(cell(tflops[c], 12, ".3g") for c in impls)
          if "dense" in impls:
            line += " " + " ".join(cell(ratio(tflops[c], tflops["dense"]), 12) for c in kernels_)
          parts.append(line)
        print(f"{proj:<4} {tokens:>6} {k:>2} {m:>7} | fwd {parts[0]} | fwd+bwd {parts[1]}", flush=True)
        for name in impls:
          for mode, label in ((0, "fwd"), (1, "fwd+bwd")):
            for note in failures({f"{name} {label}": res[name][mode]}):
              print(f"    {note}")
        for note in notes:
          print(f"    {note}")


DEFAULT_IMPLS = "jax,batched,ragged,dense"


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--full", action="store_true", help="more shapes (slower)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--tile-m", type=int, default=None,
                      help="jax: largest window (default 128); batched: its one tile (default: shape heuristic)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--balanced", action="store_true", help="equal group sizes instead of Dirichlet(1)")
  parser.add_argument("--impls", default=DEFAULT_IMPLS,
                      help="columns to time; --sweep: any of pallas,tokamax,ragged,jax,auto,dense "
                           f"(default {','.join(SWEEP_IMPLS)})")
  parser.add_argument("--check", action="store_true", help="also check outputs against ragged_dot")
  parser.add_argument("--sweep", choices=sorted(SWEEPS), help="model-shape sweep for GPU/TPU (see above)")
  parser.add_argument("--tokens", type=int, nargs="+", help=f"--sweep token counts (default {SWEEP_TOKENS})")
  parser.add_argument("--ks", type=int, nargs="+", help="--sweep top-k values (default 1..k_pre)")
  parser.add_argument("--scale", type=int, default=1, help="--sweep: divide d and ffn (CPU smoke runs)")
  parser.add_argument("--tile-k", type=int, default=None, help="--sweep: pallas tile_k (default per backend)")
  parser.add_argument("--tile-n", type=int, default=None, help="--sweep: pallas tile_n (default per backend)")
  parser.add_argument("--shapes", type=int, default=0, help="CPU table: only the first N shapes (0 = all)")
  args = parser.parse_args(argv)

  print(f"# {machine('tokamax')}")
  print(f"# dtype {args.dtype} | groups {'balanced' if args.balanced else 'Dirichlet(1)'} | median of {args.reps} | "
        f"auto order here: {', '.join(kernels.impl_order('auto'))}")
  if args.sweep:
    return run_sweep(args)
  args.impls = args.impls.split(",")
  cols = ("jax", "batched", "ragged", "dense")
  head = " ".join(f"{c:>12}" for c in cols) + f" {'rd/jax':>12} {'jax/dn':>12}"
  print(f"{'shape':<16} {'m':>6} {'G':>4} {'k->n':>9} {'tiles':>7} | fwd ms {head} | fwd+bwd ms {head}")
  rng = np.random.default_rng(0)
  shapes = FULL_SHAPES if args.full else DEFAULT_SHAPES
  for label, m, num_groups, k, n in shapes[:args.shapes or None]:
    tiles, res, notes = bench_shape(m, num_groups, k, n, args, rng)
    parts = []
    for mode in (0, 1):
      t = {c: res[c][mode] for c in cols}
      parts.append(" ".join(cell(t[c], 12) for c in cols) + f" {cell(ratio(t['ragged'], t['jax']), 12, '.1f')}"
                   f" {cell(ratio(t['jax'], t['dense']), 12, '.1f')}")
    print(f"{label:<16} {m:>6} {num_groups:>4} {f'{k}->{n}':>9} {tiles:>7} | fwd ms {parts[0]} | "
          f"fwd+bwd ms {parts[1]}", flush=True)
    for name in cols:
      for note in failures({f"{name} fwd": res[name][0], f"{name} fwd+bwd": res[name][1]}):
        if "not in --impls" not in note:
          print(f"    {note}")
    for note in notes:
      print(f"    {note}")


if __name__ == "__main__":
  main()
