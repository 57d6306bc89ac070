"""The convert CLI as a user meets it: the tokenizer travels with the weights, --overwrite both ways, one-line
errors (on the shipped demo checkpoint, so every run is a few seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phds_jax import checkpoint, convert, hf

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "phds_jax" / "assets" / "demo_base"


def _convert(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "phds_jax.convert", *args, "--noprogress"], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_round_trip_carries_the_tokenizer_and_overwrite_works_both_ways(tmp_path):
  orbax, out_hf = tmp_path / "orbax", tmp_path / "hf"
  first = _convert(f"--hf_dir={DEMO}", f"--out={orbax}")
  assert first.returncode == 0, first.stderr
  assert (orbax / "tokenizer.json").read_bytes() == (DEMO / "tokenizer.json").read_bytes()
  again = _convert(f"--hf_dir={DEMO}", f"--out={orbax}")
  assert again.returncode == 2 and again.stderr.strip().endswith("pass --overwrite to replace it")
  assert "Traceback" not in again.stderr and "overwrite=True" not in again.stderr
  assert _convert(f"--hf_dir={DEMO}", f"--out={orbax}", "--overwrite", "--dtype=bfloat16").returncode == 0
  assert checkpoint.load_params(orbax)[0].param_dtype == "bfloat16"

  to_hf = _convert(f"--orbax_dir={orbax}", f"--out_hf={out_hf}", "--k=2")  # tokenizer from the Orbax dir
  assert to_hf.returncode == 0, to_hf.stderr
  assert hf.load_tokenizer(out_hf).encode("Return a list").ids == hf.load_tokenizer(DEMO).encode("Return a list").ids
  assert json.loads((out_hf / "config.json").read_text())["num_experts_per_tok"] == 2
  refused = _convert(f"--orbax_dir={orbax}", f"--out_hf={out_hf}")
  assert refused.returncode == 2 and "pass --overwrite" in refused.stderr
  assert _convert(f"--orbax_dir={orbax}", f"--out_hf={out_hf}", "--overwrite", "--k=3").returncode == 0
  assert json.loads((out_hf / "config.json").read_text())["num_experts_per_tok"] == 3


def test_orbax_to_hf_finds_the_runs_tokenizer_or_refuses(tmp_path):
  cfg, params = hf.load(DEMO)
  run = tmp_path / "run"
  export = checkpoint.save_params(run / "final" / "orbax", cfg, params)
  with pytest.raises(convert.ConvertError, match="--tokenizer_dir=DIR, or --allow_no_tokenizer"):
    convert.find_tokenizer(export, None, allow_none=False)
  assert convert.find_tokenizer(export, None, allow_none=True) is None
  (run / "run_info.json").write_text(json.dumps({"config": {"tokenizer_dir": "", "init": {"path": str(DEMO)}}}))
  assert convert.find_tokenizer(export, None, allow_none=False) == DEMO
  with pytest.raises(convert.ConvertError, match="holds no tokenizer.json"):
    convert.find_tokenizer(export, str(tmp_path), allow_none=False)
  bare = checkpoint.save_params(tmp_path / "bare", cfg, params)
  out = _convert(f"--orbax_dir={bare}", f"--out_hf={tmp_path / 'hf'}")
  assert out.returncode == 2 and "no tokenizer found" in out.stderr and "Traceback" not in out.stderr
  assert not (tmp_path / "hf").exists()
