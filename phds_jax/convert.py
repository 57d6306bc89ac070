"""Converts checkpoints between Hugging Face safetensors and phds_jax Orbax params.

  python -m phds_jax.convert --hf_dir=DIR --out=DIR [--dtype=bfloat16]
  python -m phds_jax.convert --orbax_dir=DIR --out_hf=DIR [--k=K] [--dtype=bfloat16] [--tokenizer_dir=DIR]

`--k` sets the exported `num_experts_per_tok`: the point of PHDS is that one checkpoint runs at any top-k,
and an HF runtime reads k from config.json.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from phds_jax import checkpoint, hf

flags.DEFINE_string("hf_dir", None, "HF checkpoint directory to convert to Orbax (with --out).")
flags.DEFINE_string("out", None, "Orbax output directory (for --hf_dir).")
flags.DEFINE_string("orbax_dir", None, "phds_jax Orbax checkpoint to convert to HF (with --out_hf).")
flags.DEFINE_string("out_hf", None, "HF output directory (for --orbax_dir).")
flags.DEFINE_integer("k", None, "num_experts_per_tok written to the HF config (default: the model's k_pre).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Weight dtype of the output.")
flags.DEFINE_string("tokenizer_dir", None, "Directory whose tokenizer files are copied into --out_hf.")
flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard written to --out_hf, in GiB.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")
flags.DEFINE_bool("progress", True, "Show a progress bar over tensors.")
F = flags.FLAGS


def _summary(params: Any) -> tuple[int, int]:
  leaves = jax.tree.leaves(params)
  return sum(int(np.prod(x.shape)) for x in leaves), sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def hf_to_orbax(hf_dir: str, out: str, dtype: str | None, progress: bool, overwrite: bool) -> Any:
  cfg, params = hf.load(hf_dir, dtype, progress=progress)
  checkpoint.save_params(out, cfg, params, overwrite=overwrite)
  return params


def orbax_to_hf(orbax_dir: str, out_hf: str, k: int | None, dtype: str | None, tokenizer_dir: str | None,
                max_shard_bytes: int, progress: bool, overwrite: bool) -> Any:
  cfg, params = checkpoint.load_params(orbax_dir, dtype)
  hf.save(out_hf, cfg, params, k, max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer_dir,
          overwrite=overwrite, progress=progress)
  return params


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not F["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every metadata write at INFO
  to_orbax = F.hf_dir is not None
  if to_orbax == (F.orbax_dir is not None):
    raise app.UsageError("pass exactly one of --hf_dir (with --out) or --orbax_dir (with --out_hf)")
  dest = F.out if to_orbax else F.out_hf
  if dest is None:
    raise app.UsageError("--hf_dir needs --out" if to_orbax else "--orbax_dir needs --out_hf")
  start = time.perf_counter()
  if to_orbax:
    params = hf_to_orbax(F.hf_dir, dest, F.dtype, F.progress, F.overwrite)
  else:
    params = orbax_to_hf(F.orbax_dir, dest, F.k, F.dtype, F.tokenizer_dir, int(F.max_shard_gb * 2**30),
                         F.progress, F.overwrite)
  count, nbytes = _summary(params)
  print(f"converted {F.hf_dir or F.orbax_dir} -> {dest}: {count:,} params, {nbytes / 2**20:,.1f} MiB, "
        f"{time.perf_counter() - start:.1f}s", file=sys.stdout, flush=True)


if __name__ == "__main__":
  app.run(main)
