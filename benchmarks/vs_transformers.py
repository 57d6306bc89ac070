r"""Whole-model forward: phds_jax vs transformers + PyTorch, same weights, same inputs, same run.

    python -m benchmarks.vs_transformers                   # CPU-sized OLMoE layout
    python -m benchmarks.vs_transformers --family=qwen2_moe --batch=4 --seq_len=256

Measures k_pre and a low k for both frameworks (the PyTorch model is re-dialled by setting each router's
top_k), and checks that the two agree on the logits before timing anything.
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

from benchmarks.common import machine, median_ms
from phds_jax import hf, models

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


def set_torch_k(model, k: int) -> None:
  for layer in model.model.layers:
    gate = getattr(layer.mlp, "gate", None)
    if gate is not None and hasattr(gate, "top_k"):
      gate.top_k = k


def torch_ms(model, tokens: torch.Tensor, repeats: int) -> float:
  with torch.no_grad():
    model(tokens)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      model(tokens)
      times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default="olmoe", choices=["olmoe", "qwen2_moe", "qwen3_moe"])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--low_k", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(hf_config(args.family)).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(tmp)
    cfg, params = hf.load(tmp)
  k_pre = cfg.k_pre
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len))
  tokens_j, tokens_t = jnp.asarray(tokens, jnp.int32), torch.as_tensor(tokens)
  forward = models.jit_forward(cfg)

  print(f"# {machine()} | torch {torch.__version__} ({torch.get_num_threads()} threads) | "
        f"transformers {transformers.__version__}")
  print(f"# {args.family}: {cfg.num_layers} layers, d={cfg.hidden_size}, E={cfg.num_experts}, k_pre={k_pre}, "
        f"batch={args.batch} x seq={args.seq_len}, fp32")
  print(f"{'k':>3} {'jax ms':>9} {'torch ms':>9} {'torch/jax':>10} {'max |dlogit|':>13}")
  rows = {}
  for k in (k_pre, args.low_k):
    set_torch_k(hf_model, k)
    with torch.no_grad():
      ref = hf_model(tokens_t).logits.numpy()
    ours = np.asarray(forward(params, tokens_j, k=k)[0])
    diff = float(np.abs(ours - ref).max())
    jax_t = median_ms(forward, params, tokens_j, k=k, repeats=args.repeats)
    torch_t = torch_ms(hf_model, tokens_t, args.repeats)
    rows[k] = (jax_t, torch_t)
    print(f"{k:>3} {jax_t:>9.1f} {torch_t:>9.1f} {torch_t / jax_t:>10.2f} {diff:>13.2e}")
  (jp, tp), (jl, tl) = rows[k_pre], rows[args.low_k]
  print(f"time at k={args.low_k} / time at k={k_pre}: jax {jl / jp:.2f}, torch {tl / tp:.2f} "
        f"(expert share {args.low_k / k_pre:.2f})")


if __name__ == "__main__":
  main()
