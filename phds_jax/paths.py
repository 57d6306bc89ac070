"""Run paths that may be local files or object-store URLs (gs://, s3://, ...), through `etils.epath`.

`os.path.abspath("gs://bucket/run")` is "./gs:/bucket/run": a local directory that silently takes the run.
Here a URL with a scheme stays a URL all the way to Orbax and Grain; `file://` URLs become plain local paths
(TensorStore and `open` want those); local paths become absolute (Orbax requires it).
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import os
import re

from etils import epath

# Files shipped inside the package: the demo base models, tokenizer and data (built by tools/demo_assets.py).
ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path: str | os.PathLike) -> str | None:
  """'gs' for 'gs://b/x', None for local paths ('file://' URLs count as local)."""
  m = _SCHEME.match(os.fspath(path))
  return None if m is None or m.group(1) == "file" else m.group(1)


def is_remote(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def normalize(path: str | os.PathLike) -> str:
  """Remote URLs unchanged; `file:///x` -> '/x'; local paths absolute (with ~ expanded)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  if path.startswith("file://"):
    path = path[len("file://"):]
  return os.path.abspath(os.path.expanduser(path))


def as_epath(path: str | os.PathLike) -> epath.Path:
  return epath.Path(normalize(path))


def join(path: str | os.PathLike, *parts: str) -> str:
  """`os.path.join` that keeps 'gs://' intact (normalizes the root)."""
  root = normalize(path)
  return "/".join([root, *parts]) if is_remote(root) else os.path.join(root, *parts)


def exists(path: str | os.PathLike) -> bool:
  return as_epath(path).exists()


def isdir(path: str | os.PathLike) -> bool:
  return as_epath(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
  as_epath(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
  return as_epath(path).read_text()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes via a temporary name and a rename where the store allows, so readers never see half a file."""
  target = as_epath(path)
  tmp = target.parent / f".{target.name}.tmp"
  tmp.write_text(text)
  tmp.replace(target)


def append_text(path: str | os.PathLike, text: str) -> None:
  """Appends (object stores cannot append: read, add, rewrite)."""
  target = as_epath(path)
  if not is_remote(path):
    with open(target, "a") as f:
      f.write(text)
    return
  write_text(path, (target.read_text() if target.exists() else "") + text)


def glob(pattern: str) -> list[str]:
  """Files matching a glob pattern, local or remote."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(normalize(pattern) if pattern.startswith("file://") else pattern))
  root, _, rest = pattern.partition("*")
  base = root.rsplit("/", 1)[0]
  return sorted(str(p) for p in epath.Path(base).glob(pattern[len(base) + 1:]))


def copy_tree(src: epath.Path, dst: epath.Path) -> None:
  """Copies the files under `src` into `dst` (any epath store to any other), keeping relative paths."""
  dst.mkdir(parents=True, exist_ok=True)
  for item in src.iterdir():  # level by level (epath refuses recursive globs on object stores)
    if item.is_dir():
      copy_tree(item, dst / item.name)
    else:
      item.copy(dst / item.name, overwrite=True)


def staged(path: str, cache_dir: str | None = None) -> str:
  """A local copy of a remote file or directory (for readers that need local files: safetensors' mmap, the
  JSONL/parquet sources, tokenizers); local paths come back unchanged. Copies are cached by URL and reused
  only when complete (a marker file is written last)."""
  if not is_remote(path):
    return normalize(path)
  root = epath.Path(cache_dir or os.path.expanduser("~/.cache/phds_jax/staged"))
  local = root / hashlib.sha1(path.encode()).hexdigest()[:16] / path.rstrip("/").rsplit("/", 1)[-1]
  done = epath.Path(str(local) + ".complete")
  if not done.exists():
    src = as_epath(path)
    if src.is_dir():
      copy_tree(src, local)
    else:
      local.parent.mkdir(parents=True, exist_ok=True)
      src.copy(local, overwrite=True)
    done.write_text(path + "\n")
  return str(local)
