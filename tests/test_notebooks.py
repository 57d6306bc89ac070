"""Every notebook in colab/ runs headlessly, every cell, against a fresh copy of this checkout (as CI and a user
on Colab would run it), plus the set-up cell's promises: cell ids, a failed clone that stops with a clear
message, jax pinned by the install, one tidy progress bar.

The runs are shortened with the environment variables the notebooks document (PHDS_DEMO_STEPS, PHDS_EVAL_LIMIT).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.checkout_copy import REPO, copy_checkout

NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
FAST = {"PHDS_DEMO_STEPS": "6", "PHDS_EVAL_LIMIT": "16", "JAX_PLATFORMS": "cpu", "TQDM_MININTERVAL": "10",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # + a compilation cache shared by the kernels


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
  return copy_checkout(tmp_path_factory.mktemp("clone"))


def _execute(path: Path, cwd: Path, rerun: tuple[str, ...] = ()) -> nbformat.NotebookNode:
  """Runs every cell in order in one fresh kernel, then the cells named in `rerun` again (idempotence)."""
  nb = nbformat.read(path, as_version=4)
  env = {**FAST, "JAX_COMPILATION_CACHE_DIR": str(cwd.parent / "runs" / "jax_cache")}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    with client.setup_kernel():  # (execute() would run the cells, but not the re-runs in the same kernel)
      for index, cell in enumerate(nb.cells):
        client.execute_cell(cell, index)
      for cell_id in rerun:
        index = [c.get("id") for c in nb.cells].index(cell_id)
        again = nbformat.v4.new_code_cell(nb.cells[index].source)
        again.id = f"{cell_id}-again"
        nb.cells.append(again)
        client.execute_cell(again, len(nb.cells) - 1)
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def _text(nb: nbformat.NotebookNode, cell_id: str) -> str:
  cell = next(c for c in nb.cells if c.get("id") == cell_id)
  return "".join(o.get("text", "") for o in cell.outputs)


def test_notebooks_have_ids_and_one_setup_cell_naming_the_repository():
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)  # ids are required at nbformat 4.5: validation fails without them
    ids = [c.id for c in nb.cells]
    assert len(set(ids)) == len(ids) and all(ids), path
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].id == "setup" and code[0].source.startswith("# Where the code comes from")
    assert sum("REPO_URL =" in c.source for c in code) == 1, path
    assert not any("pip install" in c.source or "%cd" in c.source for c in code), path
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path}: committed with outputs"


def test_every_notebook_runs_from_a_fresh_copy(checkout):
  """Each notebook start to end in the copy (the demo first: dial_k uses its checkpoint); then the demo's set-up
  and config cells again in the same kernel, as a user re-running them would."""
  ran = {path.name: _execute(checkout / "colab" / path.name, checkout / "colab",
                             rerun=("setup", "config") if path.name == "phds_demo.ipynb" else ())
         for path in sorted(NOTEBOOKS, key=lambda p: p.name != "phds_demo.ipynb")}  # every notebook, demo first
  demo, dial = ran["phds_demo.ipynb"], ran["dial_k.ipynb"]
  setup_out = _text(demo, "setup")
  assert "accelerator: cpu" in setup_out and "using the checkout in place" in setup_out
  assert _text(demo, "setup-again").splitlines()[-1] == setup_out.splitlines()[-1]  # same place, nothing new
  assert _text(demo, "config-again") == _text(demo, "config")
  train = next(c for c in demo.cells if c.get("id") == "train")
  streams = [o for o in train.outputs if o.output_type == "stream"]
  assert len(streams) <= 12, f"{len(streams)} stream chunks in the training cell"  # one bar, not hundreds
  assert "held-out loss per k" in _text(demo, "train")
  images = [o for c in demo.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 3
  run = checkout / "runs" / "colab-demo-6"
  assert json.loads((run / "eval" / "results.json").read_text())["meta"]["ks"] == [1, 2, 3, 4]
  assert "colab-demo-6/final/hf" in _text(dial, "load")  # dial k picked up the PHDS checkpoint the demo wrote
  assert _text(dial, "generate").count("k=") == 4 and "{1:" in _text(dial, "latency")
  plot = next(c for c in dial.cells if c.get("id") == "plot")
  assert any("image/png" in o.get("data", {}) for o in plot.outputs)
  assert (checkout / "runs" / "dial_k.png").stat().st_size > 0


def test_a_failed_clone_stops_with_a_clear_message(tmp_path):
  nb = nbformat.read(NOTEBOOKS[0], as_version=4)
  source = nb.cells[[c.id for c in nb.cells].index("setup")].source
  source = source.replace('REPO_URL = "https://github.com/YOUR_ORG/phds_jax.git"',
                          f'REPO_URL = "{tmp_path / "no-such-repo"}"', 1)
  out = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert out.returncode != 0
  assert f"Could not clone {tmp_path / 'no-such-repo'}" in out.stderr and "Set REPO_URL" in out.stderr


def test_install_pins_the_runtimes_jax(tmp_path):
  sys.path.insert(0, str(REPO / "colab"))
  try:
    import runtime
  finally:
    sys.path.remove(str(REPO / "colab"))
  import jax
  import jaxlib
  pins = runtime.jax_constraints()
  assert f"jax=={jax.__version__}" in pins and f"jaxlib=={jaxlib.__version__}" in pins
  reqs = runtime.install_requires(REPO)
  assert any(r.startswith("jax>=") for r in reqs) and any(r.startswith("flax") for r in reqs)
  assert runtime.missing_requirements(REPO) == []  # this venv: the notebooks import the checkout, no pip
  assert runtime.detect_accelerator() in ("cpu", "gpu", "tpu")
