"""Runtime set-up for the notebooks in colab/: find or clone the code, install it without touching jax, say where.

Each notebook's first cell finds a checkout (the one it runs in, e.g. CI or a local Jupyter; else a clone of
REPO_URL), then calls `prepare(checkout)` from this file. Re-running the cell is harmless: nothing is cloned or
installed twice, and the working directory is always the checkout's root (never a `%cd` relative to where the
last run left it).

jax is the runtime's: a Colab GPU or TPU runtime ships a jax built for its accelerator, and a plain
`pip install -e .` could replace it with a CPU build. On those runtimes the project is installed with a
constraints file that pins jax, jaxlib and the installed jax plugins to their current versions, so pip either
keeps them or stops with a conflict (and says how to upgrade the accelerator build) instead of swapping them.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Distributions that make up "the runtime's jax": pinned, never upgraded or replaced by the install.
JAX_DISTRIBUTIONS = ("jax", "jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda12-pjrt",
                     "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-rocm-plugin", "jax-rocm-pjrt")


def detect_accelerator() -> str:
  """'tpu', 'gpu' or 'cpu', from the machine (before jax is imported, so nothing initialises a backend)."""
  if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE") or Path("/dev/accel0").exists() \
      or Path("/dev/vfio/0").exists():
    return "tpu"
  if shutil.which("nvidia-smi"):
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    if listed.returncode == 0 and "GPU" in listed.stdout:
      return "gpu"
  return "cpu"


def install_requires(checkout: Path) -> list[str]:
  """setup.py's INSTALL_REQUIRES, read without running setup.py."""
  tree = ast.parse((checkout / "setup.py").read_text())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTALL_REQUIRES" for t in node.targets):
      return list(ast.literal_eval(node.value))
  raise RuntimeError(f"{checkout / 'setup.py'} has no INSTALL_REQUIRES list")


def _satisfied(requirement: str) -> bool:
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top  (pip's own dependency)
  req = Requirement(requirement)
  try:
    return req.specifier.contains(md.version(req.name), prereleases=True)
  except md.PackageNotFoundError:
    return False


def missing_requirements(checkout: Path) -> list[str]:
  return [r for r in install_requires(checkout) if not _satisfied(r)]


def jax_constraints() -> list[str]:
  """`name==version` for each installed jax distribution (see JAX_DISTRIBUTIONS)."""
  pins = []
  for name in JAX_DISTRIBUTIONS:
    try:
      pins.append(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
      pass
  return pins


def _imports_from(checkout: Path) -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("phds_jax")
  return spec is not None and spec.origin is not None and Path(spec.origin).resolve().is_relative_to(checkout)


def install(checkout: Path, accelerator: str = "cpu", quiet: bool = True) -> str:
  """Makes `import phds_jax` load `checkout`; pip only for what is missing. On a GPU/TPU runtime jax is pinned
  (its accelerator build is the runtime's); on CPU pip may upgrade jax, there is nothing to lose. Returns what
  it did."""
  missing = missing_requirements(checkout)
  if not missing:  # every dependency is here (a prepared venv, CI, a re-run): import the checkout directly
    if str(checkout) not in sys.path:
      sys.path.insert(0, str(checkout))
    return "dependencies present; using the checkout in place"
  pins = jax_constraints() if accelerator != "cpu" else []
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write("\n".join(pins) + "\n")
  cmd = [sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), "-e", str(checkout), "-c", f.name]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    extra = {"gpu": "cuda12", "tpu": "tpu"}.get(accelerator)
    hint = (f"\nIf the runtime's jax is older than {checkout / 'setup.py'} asks for, upgrade its accelerator build "
            f"first (pip install -U 'jax[{extra}]'), restart the runtime, and re-run this cell." if extra else "")
    raise RuntimeError(f"pip install failed (pinned: {', '.join(pins) or 'nothing'}):\n"
                       f"{done.stdout[-2000:]}{done.stderr[-2000:]}{hint}")
  import site  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  importlib.invalidate_caches()
  for d in site.getsitepackages():  # the editable install's finder, without restarting the kernel
    site.addsitedir(d)
  if str(checkout) not in sys.path:
    sys.path.insert(0, str(checkout))
  pinned = " with jax pinned" if pins else ""
  return f"installed {len(missing)} missing requirement(s){pinned}: {', '.join(missing)}"


def prepare(checkout: str | os.PathLike) -> dict[str, str]:
  """Installs (if needed) and enters `checkout`; returns {accelerator, jax, devices, install}. Idempotent."""
  checkout = Path(checkout).resolve()
  os.chdir(checkout)  # absolute: re-running never walks into a subdirectory
  os.environ.setdefault("TQDM_MININTERVAL", "10")  # one progress line redrawn every 10 s, not hundreds of chunks
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  accelerator = detect_accelerator()
  if accelerator == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no probing of absent accelerator plugins
  action = install(checkout, accelerator)
  if not _imports_from(checkout):
    raise RuntimeError(f"`import phds_jax` does not load {checkout}: restart the runtime and re-run this cell")
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if accelerator != "cpu" and devices[0].platform == "cpu":
    print(f"warning: this is a {accelerator.upper()} runtime but jax {jax.__version__} only sees the CPU; "
          "keep the runtime's jax (do not pip install jax) or restart the runtime")
  info = {"accelerator": accelerator, "jax": jax.__version__,
          "devices": f"{len(devices)} x {devices[0].device_kind}", "install": action}
  print(" | ".join(f"{k}: {v}" for k, v in info.items()))
  return info
