"""Benchmarks at toy scale: every script runs to the end, prints the machine and versions, and a column that
fails here for real (tokamax does not import on jax 0.10; a 4 TiB allocation is out of memory) prints
"n/a (reason)" while the rest of its line still has numbers. Speed is not asserted: that is what the
benchmarks are for."""

import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common, gmm, moe_layer, prefill, train_step

NUMBER = r"\d+\.\d+"


def _rows(out: str, first: str) -> list[str]:
  return [line for line in out.splitlines() if re.match(rf"\s*{first}\s", line)]


def test_attempt_reports_real_failures():
  oom = common.attempt(lambda: jax.jit(lambda: jnp.ones((2**40,), jnp.float32))().block_until_ready())
  assert isinstance(oom, common.NA) and oom.tag == "OOM" and "RESOURCE_EXHAUSTED" in oom.detail
  missing = common.attempt(__import__, "tokamax")
  assert isinstance(missing, common.NA) and missing.tag == "missing"
  assert common.attempt(lambda: 3.0) == 3.0
  assert common.cell(oom, 12) == "   n/a (OOM)" and common.cell(1.234, 6) == "  1.23"
  assert isinstance(common.ratio(oom, 2.0), common.NA) and common.ratio(3.0, 2.0) == 1.5
  assert "jax " + jax.__version__ in common.machine() and "cpu" in common.machine()


def test_gmm_sweep_line_survives_a_missing_implementation(capsys):
  gmm.main(["--sweep", "olmoe", "--tokens", "16", "--ks", "1", "--scale", "16", "--reps", "1", "--check",
            "--impls", "tokamax,ragged,jax,dense"])
  out = capsys.readouterr().out
  assert "jax " + jax.__version__ in out and "tokamax" in out.splitlines()[0]
  rows = _rows(out, "wi") + _rows(out, "wo")
  assert len(rows) == 2
  for row in rows:
    assert "n/a (not impl)" in row  # the tokamax column (and its ratio to dense)
    assert len(re.findall(NUMBER, row)) >= 8  # ragged, jax, dense and their ratios, forward and backward
  assert "tokamax fwd: NotImplementedError" in out  # the reason, once, under the line


def test_moe_layer_survives(capsys):
  moe_layer.main(["--preset", "tiny", "--tokens", "32", "--impls", "ragged_dot", "tokamax"])
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if re.match(r"\s+[1-4]\s+[01]\.\d\d\s", line)]
  assert len(rows) == 4 and all("n/a (not impl)" in r and len(re.findall(NUMBER, r)) >= 4 for r in rows)


def test_prefill_side_by_side_with_transformers(capsys):
  prefill.main(["--preset", "tiny", "--batch", "1", "--seq_len", "16", "--ks", "4", "1", "--repeats", "1",
                "--gmm-impls", "auto", "tokamax", "--attention-impls", "xla"])
  out = capsys.readouterr().out
  assert "transformers" in out.splitlines()[0] and "HF torch" in out
  rows = _rows(out, "4") + _rows(out, "1")
  assert len(rows) == 2
  for row in rows:
    assert row.count("n/a (not impl)") == 2  # tokamax/xla: ms and t/t_pre
    assert len(re.findall(NUMBER, row)) >= 5  # k/k_pre, auto/xla and HF: ms and t/t_pre
  assert "HF / best of ours" in out


def test_train_step_reports_memory_and_survives(capsys):
  train_step.main(["--presets", "tiny", "--tokens", "64", "--seq_len", "32", "--ks", "2", "--no-hf",
                   "--gmm-impls", "auto", "tokamax", "--mesh", "fsdp=2"])
  out = capsys.readouterr().out
  assert re.search(r"# memory: .*mesh data=1 x fsdp=2 x expert=1: per device params .*float32 master", out)
  assert len(_rows(out, "2")) == 4  # hard and soft for each impl
  ours, missing = _rows(out, "2")[:2], _rows(out, "2")[2:]
  assert all(re.search(r"\s(hard|soft)\s+\d+\.\d\s+\d+\s", r) for r in ours)  # ms/step, tokens/s
  assert all("n/a (not impl)" in r for r in missing)


@pytest.mark.parametrize("text", ["fsdp=8", "data=2,expert=4"])
def test_parse_mesh(text):
  mesh = train_step.parse_mesh(text)
  assert ",".join(f"{k}={v}" for k, v in mesh.items()) == text
