"""README.md runs as written: every bash/python block is either executed here, in README order, in a fresh copy of
the checkout on the shipped demo assets, or carries a marker saying why not (real weights or data, a running
server, an install). The marker is the HTML comment on the line before the block:

    <!-- docs-test: run -->                        executed as it is
    <!-- docs-test: run, shortened ... -->         executed with SHORT_TRAIN appended to each training command
    <!-- docs-test: needs real weights/data ... --> / needs a running server ... / skip: REASON
    <!-- test-command -->                          CI's own command (this suite)
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.checkout_copy import REPO, copy_checkout

README = REPO / "README.md"
LANGS = ("bash", "sh", "shell", "python")
NOT_RUN = ("needs real weights/data", "needs a running server", "skip:")
# The quick-start demo is ~2 minutes; the docs test trains a few steps of the same config instead.
# Its multiple-choice evaluation is left to the README's evaluation block, which runs next.
SHORT_TRAIN = ("--config.num_steps=4 --config.eval.every_steps=2 --config.checkpoint.every_steps=2 "
               "--config.eval.batches=1 --config.batch_size=8 '--config.final_eval.tasks=()'")
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def readme_blocks(text: str) -> list[tuple[str, str, str, int]]:
  """(marker, language, code, line) for each fenced block in LANGS; marker '' when the line before has none."""
  out = []
  for m in _BLOCK.finditer(text):
    if m.group(1) not in LANGS:
      continue
    before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
    marker = ""
    if before == "<!-- test-command -->":
      marker = "test-command"
    elif before.startswith("<!-- docs-test:") and before.endswith("-->"):
      marker = before[len("<!-- docs-test:"):-len("-->")].strip()
    out.append((marker, m.group(1), m.group(2), text[:m.start()].count("\n") + 1))
  return out


def shorten(code: str) -> str:
  """Appends SHORT_TRAIN to every `phds_jax.train` command (continuation lines joined first)."""
  lines = code.replace("\\\n", " ").splitlines()
  return "\n".join(f"{line} {SHORT_TRAIN}" if "phds_jax.train" in line and "--dry_run" not in line else line
                   for line in lines)


def test_every_block_is_marked():
  blocks = readme_blocks(README.read_text(encoding="utf-8"))
  assert len(blocks) >= 8
  for marker, _, code, line in blocks:
    assert marker, f"README.md:{line}: unmarked block (add <!-- docs-test: run --> or a reason):\n{code}"
    assert (marker == "test-command" or marker == "run" or marker.startswith("run, shortened")
            or marker.startswith(NOT_RUN)), f"README.md:{line}: unknown marker {marker!r}"
  test_command = [code for marker, _, code, _ in blocks if marker == "test-command"]
  assert test_command == ['pip install -e ".[test]" && python -m pytest -q tests\n']  # CI runs exactly this


def test_readme_blocks_run_on_the_demo_assets(tmp_path):
  work = copy_checkout(tmp_path / "clone")
  env = {**os.environ, "PYTHONPATH": str(work), "JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1",
         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
  ran = []
  for marker, lang, code, line in readme_blocks((work / "README.md").read_text(encoding="utf-8")):
    if not marker.startswith("run"):
      continue
    if marker.startswith("run, shortened"):
      code = shorten(code)
    if lang == "python":
      script = work / f"readme_block_{line}.py"
      script.write_text(code)
      cmd = [sys.executable, str(script)]
    else:
      cmd = ["bash", "-euo", "pipefail", "-c", code]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    print(f"README.md:{line}: {time.perf_counter() - start:.1f}s")  # pytest -s shows where the time goes
    assert done.returncode == 0, f"README.md:{line} failed ({done.returncode}):\n{code}\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    ran.append((line, done.stdout))
  out = "\n".join(stdout for _, stdout in ran)
  assert len(ran) >= 6
  # The quick start's run, and what the later blocks made from it.
  assert "held-out loss" in out and (work / "runs/demo/final/hf/tokenizer.json").is_file()
  summary = json.loads((work / "runs/demo-eval/results.json").read_text())
  assert summary["meta"]["ks"] == [1, 2, 3, 4]
  assert set(summary["tasks"]) == {"jsonl:mc_eval", "ppl:pretrain"}
  assert json.loads((work / "runs/demo-hf-k2/config.json").read_text())["num_experts_per_tok"] == 2
  assert (work / "runs/demo-hf-k2/tokenizer.json").is_file()
  assert "next token at k=4" in out and out.count(" -> ") >= 2  # the Python API's forward and decode loop
  assert "DOES NOT FIT" not in out and "fsdp=4" in out and "--worker=all" in out  # launch dry runs
  assert not (work / "runs/demo/checkpoints").exists() or len(list((work / "runs/demo/checkpoints").iterdir())) <= 3
