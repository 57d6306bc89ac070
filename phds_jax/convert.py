"""Converts checkpoints between Hugging Face safetensors and phds_jax Orbax params.

  python -m phds_jax.convert --hf_dir=DIR --out=DIR [--dtype=bfloat16]
  python -m phds_jax.convert --orbax_dir=DIR --out_hf=DIR [--k=K] [--dtype=bfloat16] [--tokenizer_dir=DIR]

`--k` sets the exported `num_experts_per_tok`: the point of PHDS is that one checkpoint runs at any top-k,
and an HF runtime reads k from config.json.

The tokenizer travels with the weights, because an HF directory without one cannot be evaluated or served:
HF -> Orbax copies the tokenizer files beside the params (so `phds_jax.eval` finds them); Orbax -> HF takes them
from --tokenizer_dir, else from the Orbax directory itself, else from the training run that wrote it
(`run_info.json` of a `WORKDIR/final/orbax` export names the tokenizer the run used). Without any of these it
refuses, unless --allow_no_tokenizer. An existing non-empty output is refused unless --overwrite.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from phds_jax import checkpoint, cli, console, errors, hf


def define_flags() -> None:
  """The CLI's flags, defined only when run as a script: importing this module (tests, notebooks) defines
  nothing that could clash with another entry point's flags (e.g. --out) in the same process."""
  flags.DEFINE_string("hf_dir", None, "HF checkpoint directory to convert to Orbax (with --out).")
  flags.DEFINE_string("out", None, "Orbax output directory (for --hf_dir).")
  flags.DEFINE_string("orbax_dir", None, "phds_jax Orbax checkpoint to convert to HF (with --out_hf).")
  flags.DEFINE_string("out_hf", None, "HF output directory (for --orbax_dir).")
  flags.DEFINE_integer("k", None, "num_experts_per_tok written to the HF config (default: the model's k_pre).")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Weight dtype of the output.")
  flags.DEFINE_string("tokenizer_dir", None, "Directory whose tokenizer files are copied into the output "
                      "(default for Orbax -> HF: the Orbax dir's own, else the training run's tokenizer).")
  flags.DEFINE_bool("allow_no_tokenizer", False, "Write an HF directory without tokenizer files when none is found.")
  flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard written to --out_hf, in GiB.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory (either direction).")
  flags.DEFINE_bool("progress", True, "Show a progress bar over tensors.")


F = flags.FLAGS

TOKENIZER_FILE = "tokenizer.json"


class ConvertError(errors.UserError, ValueError):
  """A conversion the user asked for that cannot be done as asked (the message says what to pass)."""


def _summary(params: Any) -> tuple[int, int]:
  leaves = jax.tree.leaves(params)
  return sum(int(np.prod(x.shape)) for x in leaves), sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def check_output(dest: str | Path, overwrite: bool) -> None:
  """Refuses a non-empty output directory before any weights are read (minutes, for a 7B model)."""
  path = Path(dest)
  if path.exists() and not path.is_dir():
    raise ConvertError(f"{path} exists and is not a directory")
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise ConvertError(f"{path} exists and is not empty; pass --overwrite to replace it")


def run_tokenizer_dir(orbax_dir: str | Path) -> Path | None:
  """The tokenizer directory of the training run that exported `orbax_dir` (WORKDIR/final/orbax), if any."""
  info = Path(orbax_dir).absolute().parent.parent / "run_info.json"
  if not info.is_file():
    return None
  config = json.loads(info.read_text()).get("config", {})
  candidate = config.get("tokenizer_dir") or config.get("init", {}).get("path")
  return Path(candidate) if candidate and (Path(candidate) / TOKENIZER_FILE).is_file() else None


def find_tokenizer(orbax_dir: str | Path, tokenizer_dir: str | None, allow_none: bool) -> Path | None:
  """--tokenizer_dir, else the Orbax dir's own files, else the run's tokenizer; None only if allowed."""
  if tokenizer_dir is not None:
    if not (Path(tokenizer_dir) / TOKENIZER_FILE).is_file():
      raise ConvertError(f"--tokenizer_dir={tokenizer_dir} holds no {TOKENIZER_FILE}")
    return Path(tokenizer_dir)
  if (Path(orbax_dir) / TOKENIZER_FILE).is_file():
    return Path(orbax_dir)
  found = run_tokenizer_dir(orbax_dir)
  if found is None and not allow_none:
    raise ConvertError(f"no tokenizer found for {orbax_dir} (no {TOKENIZER_FILE} in it, no run_info.json of a "
                       "training run above it): pass --tokenizer_dir=DIR, or --allow_no_tokenizer to write an HF "
                       "directory that evaluation and serving cannot use as it is")
  return found


def hf_to_orbax(hf_dir: str, out: str, dtype: str | None, progress: bool, overwrite: bool) -> Any:
  cfg, params = hf.load(hf_dir, dtype, progress=progress)
  root = checkpoint.save_params(out, cfg, params, overwrite=overwrite)
  for name in hf.TOKENIZER_FILES:  # one list of what a tokenizer is
    if (Path(hf_dir) / name).is_file():
      shutil.copy2(Path(hf_dir) / name, root / name)
  return params


def orbax_to_hf(orbax_dir: str, out_hf: str, k: int | None, dtype: str | None, tokenizer_dir: str | None,
                max_shard_bytes: int, progress: bool, overwrite: bool, allow_no_tokenizer: bool = False) -> Any:
  tokenizer = find_tokenizer(orbax_dir, tokenizer_dir, allow_no_tokenizer)
  cfg, params = checkpoint.load_params(orbax_dir, dtype)
  hf.save(out_hf, cfg, params, k, max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer,
          overwrite=overwrite, progress=progress)
  if tokenizer is None:
    logging.warning("wrote %s without a tokenizer (--allow_no_tokenizer)", out_hf)
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
  check_output(dest, F.overwrite)  # errors: ConvertError / CheckpointError -> one line via cli.run
  if to_orbax:
    params = hf_to_orbax(F.hf_dir, dest, F.dtype, F.progress, F.overwrite)
  else:
    params = orbax_to_hf(F.orbax_dir, dest, F.k, F.dtype, F.tokenizer_dir, int(F.max_shard_gb * 2**30),
                         F.progress, F.overwrite, F.allow_no_tokenizer)
  count, nbytes = _summary(params)
  print(f"converted {F.hf_dir or F.orbax_dir} -> {dest}: {count:,} params, {nbytes / 2**20:,.1f} MiB, "
        f"{time.perf_counter() - start:.1f}s", file=sys.stdout, flush=True)


if __name__ == "__main__":
  console.quiet_backend_probe()
  define_flags()
  cli.run(main)
