"""A fresh copy of this checkout for tests that run the project as a user would (README blocks, notebooks)."""

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def copy_checkout(dst: Path) -> Path:
  """The files a clone of this working state would hold: tracked plus untracked-but-not-ignored (no runs/,
  no build outputs), so a test sees uncommitted edits the way CI sees a commit."""
  listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                          check=True).stdout.decode()
  for name in filter(None, listed.split("\0")):
    src = REPO / name
    if src.is_file():
      (dst / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dst / name)
  return dst
