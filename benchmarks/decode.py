r"""Decode latency per k: ours (gathered-weights and grouped MoE paths) vs the weight-read floor vs transformers.

    python -m benchmarks.decode                          # CPU: a small OLMoE layout, fp32, batch 1 and 64
    python -m benchmarks.decode --preset=olmoe --batch 1 64 --dtype=bfloat16     # GPU: OLMoE-1B-7B shape

Per k it prints ms per decoded token of the server's own step (engine.decode_step_fn, per-row cache, greedy)
at each batch size with the few-token path on (`decode_moe=gather`) and off (`grouped`, the sort + grouped
matmul + un-permute path), transformers' cached decode step on the same weights, and at batch 1 the
weight-read floor: the bytes one step must read (every non-expert weight, the lm_head included, plus
min(E, batch·k) experts per MoE layer) over the bandwidth measured in this run. It also counts the kernels
(top-level ops of the compiled step) per layer for both paths. Targets (DEVELOPERS: recorded, not asserted):
GPU batch 1 >= 50% of the floor at every k, t(2)/t(8) <= 0.6, >= 5x transformers; CPU >= 2x transformers at
every k and time falling with k.
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

from benchmarks.common import attempt, cell, classify, failures, machine, ok, ratio
from benchmarks.moe_layer import memory_bandwidth_gbps
from phds_jax import hf, models
from phds_jax.serve import engine

PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, num_experts=8, num_experts_per_tok=4, intermediate_size=32),  # smoke test
    # The vs_transformers CPU layout: OLMoE family, 4 layers, d 512, 32 experts of 256, top-8.
    "cpu": dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, num_experts=32, num_experts_per_tok=8, intermediate_size=256),
    # OLMoE-1B-7B: 16 layers, d 2048, 64 experts of 1024, top-8, vocab 50304.
    "olmoe": dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, intermediate_size=1024),
}


def build(preset: str, dtype: str, with_torch: bool):
  """(cfg, params, torch model or an NA): random weights shared by both frameworks when torch runs."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf_cfg = transformers.OlmoeConfig(**PRESETS[preset], max_position_embeddings=4096)
  torch_model: object = classify(RuntimeError("not requested"))
  with tempfile.TemporaryDirectory() as tmp:
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    model.save_pretrained(tmp)
    cfg, params = hf.load(tmp, dtype=dtype)
    if with_torch:
      device = "cuda" if torch.cuda.is_available() else "cpu"
      torch_model = model.to(device=device, dtype=getattr(torch, dtype))
  return cfg.replace(dtype=dtype), params, torch_model


def floor_bytes(cfg: models.ModelConfig, params, batch: int, k: int) -> int:
  """Bytes a decode step must read at least: all weights but the embedding table and unvisited experts."""
  flat = jax.tree_util.tree_leaves_with_path(params)
  total = 0
  for path, leaf in flat:
    name = jax.tree_util.keystr(path)
    if "embed" in name and not cfg.tie_embeddings:
      total += batch * leaf.shape[-1] * leaf.dtype.itemsize  # one row per token
    elif "'wi'" in name or "'wo'" in name:
      if "moe" in name and "shared" not in name:
        total += min(cfg.num_experts, batch * k) * (leaf.size // cfg.num_experts) * leaf.dtype.itemsize
      else:
        total += leaf.size * leaf.dtype.itemsize
    else:
      total += leaf.size * leaf.dtype.itemsize
  return total


def kernels_per_layer(cfg: models.ModelConfig, k: int, batch: int) -> int:
  """Top-level ops (≈ kernel launches on an accelerator) one layer adds to the compiled decode step."""
  skip = ("parameter(", "constant(", "get-tuple-element(", " tuple(", "bitcast(")

  def count(layers: int) -> int:
    c = cfg.replace(num_layers=layers, moe_layers=())
    p = jax.eval_shape(lambda: models.init_params(c, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: engine.init_slots(c, batch, 64))
    samp = tuple(jax.ShapeDtypeStruct((batch,), d) for d in (jnp.float32, jnp.float32, jnp.int32, jnp.int32))
    vec = lambda d: jax.ShapeDtypeStruct((batch,), d)
    text = engine.decode_step_fn(c).lower(p, cache, vec(jnp.int32), vec(jnp.bool_), vec(jnp.int32), samp,
                                          k=k).compile().as_text()
    entry = text[text.index("ENTRY"):]
    return sum(1 for line in entry.splitlines() if " = " in line and not any(s in line for s in skip))

  return count(2) - count(1)


def ours_ms(cfg, params, k: int, batch: int, context: int, new_tokens: int, repeats: int) -> float:
  return float(np.median(engine.time_decode(cfg, params, k=k, batch_size=batch, context_len=context,
                                            new_tokens=new_tokens, repeats=repeats)))


def torch_ms(model, k: int, batch: int, context: int, new_tokens: int) -> float:
  """Median ms of transformers' cached one-token step (eager, no_grad) after a `context`-token prefill."""
  import torch
  from benchmarks.vs_transformers import set_torch_k
  set_torch_k(model, k)
  device = next(model.parameters()).device
  tokens = torch.ones((batch, context), dtype=torch.long, device=device)
  times = []
  with torch.no_grad():
    out = model(tokens, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
      if device.type == "cuda":
        torch.cuda.synchronize()
      start = time.perf_counter()
      out = model(nxt, past_key_values=past, use_cache=True)
      past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
      if device.type == "cuda":
        torch.cuda.synchronize()
      times.append((time.perf_counter() - start) * 1e3)
  return float(np.median(times[2:] if len(times) > 4 else times))


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 elsewhere")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
  parser.add_argument("--context", type=int, default=512)
  parser.add_argument("--new_tokens", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--ks", type=int, nargs="+", default=None, help="default: 1..k_pre")
  parser.add_argument("--no_torch", action="store_true", help="skip the transformers column")
  args = parser.parse_args(argv)
  cpu = jax.default_backend() == "cpu"
  dtype = args.dtype or ("float32" if cpu else "bfloat16")
  batches = args.batch

  cfg, params, torch_model = build(args.preset, dtype, with_torch=not args.no_torch)
  ks = args.ks or list(range(1, cfg.k_pre + 1))
  gbps = memory_bandwidth_gbps(64 if args.preset == "tiny" else 512)
  grouped = cfg.replace(decode_moe="grouped")
  import torch
  import transformers
  print(f"# {machine()} | torch {torch.__version__} | transformers {transformers.__version__}")
  print(f"# {args.preset}: {cfg.num_layers} layers, d={cfg.hidden_size}, E={cfg.num_experts}, k_pre={cfg.k_pre}, "
        f"{dtype}, context {args.context}, {args.new_tokens}x{args.repeats} timed steps; bandwidth {gbps:.0f} GB/s")
  for k in sorted({ks[0], ks[-1]}):
    print(f"# kernels per layer in one compiled decode step, batch 1, k={k}: "
          f"gather {kernels_per_layer(cfg, k, 1)}, grouped {kernels_per_layer(grouped, k, 1)}")
  timing = dict(new_tokens=args.new_tokens, repeats=args.repeats)
  results: dict[tuple[int, int], dict] = {}
  for batch in batches:
    print(f"\nbatch {batch}: ms per decode step")
    print(f"{'k':>3} {'gather':>10} {'grouped':>10} {'hf':>10} {'floor':>8} {'% floor':>8} {'hf/ours':>8}")
    for k in ks:
      row = {
          "gather": attempt(ours_ms, cfg, params, k, batch, args.context, **timing),
          "grouped": attempt(ours_ms, grouped, params, k, batch, args.context, **timing),
          "hf": (attempt(torch_ms, torch_model, k, batch, args.context, args.new_tokens)
                 if ok(torch_model) else torch_model),
      }
      best = min((v for v in (row["gather"], row["grouped"]) if ok(v)), default=row["gather"])
      floor = floor_bytes(cfg, params, batch, k) / (gbps * 1e9) * 1e3
      share = ratio(floor, best)
      results[(batch, k)] = dict(row, best=best, floor=floor)
      print(f"{k:>3} {cell(row['gather'])} {cell(row['grouped'])} {cell(row['hf'])} {floor:>8.3f} "
            f"{cell(share if not ok(share) else 100 * share, 8, '.1f')} {cell(ratio(row['hf'], best), 8)}")
      for line in failures(row):
        print(f"    {line}")
  k_hi, k_lo = ks[-1], (2 if 2 in ks else ks[0])
  print("\nsummary")
  for batch in batches:
    times = [results[(batch, k)]["best"] for k in ks]
    falls = ok(*times) and all(a < b for a, b in zip(times, times[1:]))
    print(f"  batch {batch}: t({k_lo})/t({k_hi}) = {cell(ratio(times[ks.index(k_lo)], times[-1]), 0)}; "
          f"time strictly falls with k: {falls}")
  b1 = [results[(batches[0], k)] for k in ks]
  speedups = [ratio(r["hf"], r["best"]) for r in b1]
  shares = [ratio(r["floor"], r["best"]) for r in b1]
  if ok(*speedups):
    print(f"  batch {batches[0]}: ours vs transformers min {min(speedups):.2f}x (target {'2' if cpu else '5'}x)")
  if ok(*shares):
    print(f"  batch {batches[0]}: share of the weight-read floor min {100 * min(shares):.1f}% "
          f"(target on GPU: 50%)")


if __name__ == "__main__":
  main()
