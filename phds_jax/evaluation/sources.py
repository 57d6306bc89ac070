"""Raw evaluation documents from local JSONL / JSON / parquet / text files or a prepared tfds dataset.

Every document comes back as `(location, doc)`: `location` (`file.jsonl:12` 1-based line, `file.parquet: row 3`
0-based, `tfds:name/split[7]`) is its id in the per-sample files and the prefix of every error about it, so bad
data is always reported where it lives. tfds is read with `tfds.data_source(..., download=False)` only: a dataset
must already be prepared (array_record) under `data_dir`; nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from phds_jax import cli

Doc = dict[str, Any]
Located = tuple[str, Doc]


class EvalDataError(cli.UserError, ValueError):
  """Unusable evaluation data; the message starts with where it is (file:line, file: row N, tfds:...[i])."""


def need(doc: Mapping[str, Any], key: str, where: str, task: str) -> Any:
  """`doc[key]`, or an error naming the record, the task and the fields it does have."""
  if not isinstance(doc, Mapping):
    raise EvalDataError(f"{where}: {task}: expected a JSON object, got {type(doc).__name__}")
  if key not in doc or doc[key] is None:
    raise EvalDataError(f"{where}: {task}: missing field {key!r} (record has: {', '.join(sorted(doc))})")
  return doc[key]


def to_python(x: Any) -> Any:
  """tfds/numpy values -> plain Python (bytes -> str, arrays -> lists), so every task reads one schema."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, Mapping):
    return {str(k): to_python(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return [to_python(v) for v in x.tolist()] if x.ndim else to_python(x.item())
  if isinstance(x, (list, tuple)):
    return [to_python(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def _jsonl(path: Path, limit: int | None) -> list[Located]:
  out: list[Located] = []
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if limit is not None and len(out) >= limit:
        break
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
      if not isinstance(doc, dict):
        raise EvalDataError(f"{path}:{lineno}: expected a JSON object, got {type(doc).__name__}")
      out.append((f"{path}:{lineno}", doc))
  return out


def _json_array(path: Path, limit: int | None) -> list[Located]:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise EvalDataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
  if not isinstance(data, list):
    raise EvalDataError(f"{path}: expected a JSON array of objects (or use .jsonl)")
  return [(f"{path}: item {i}", doc) for i, doc in enumerate(data[:limit])]


def _parquet(path: Path, limit: int | None) -> list[Located]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types.
    raise EvalDataError(f"{path}: cannot read parquet: {e}") from e
  if limit is not None:
    table = table.slice(0, limit)
  return [(f"{path}: row {i}", doc) for i, doc in enumerate(table.to_pylist())]


def _text(path: Path, limit: int | None) -> list[Located]:
  """A .txt file is one document (the natural unit for perplexity)."""
  return [(str(path), {"text": path.read_text(encoding="utf-8")})][:limit]


_READERS = {".jsonl": _jsonl, ".json": _json_array, ".parquet": _parquet, ".txt": _text}


def read_file(path: str | os.PathLike, limit: int | None = None) -> list[Located]:
  """Documents of a local file, in file order (the first `limit` of them); empty files are an error."""
  p = Path(path)
  reader = _READERS.get(p.suffix.lower())
  if reader is None:
    raise EvalDataError(f"{p}: unknown file type {p.suffix!r}; expected one of {', '.join(_READERS)}")
  if not p.is_file():
    raise EvalDataError(f"{p}: no such file")
  docs = reader(p, limit)
  if not docs:
    raise EvalDataError(f"{p}: no records (empty file)")
  return docs


def read_tfds(name: str, split: str, data_dir: str | None, limit: int | None = None) -> list[Located]:
  """The first `limit` records of a prepared tfds dataset, decoded to plain Python."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = f"tfds:{name}/{split}"
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises a variety of not-found / format errors.
    raise EvalDataError(f"{where}: cannot open (data_dir={data_dir!r} must hold the prepared dataset in "
                        f"array_record format; or pass a local file as TASK:PATH): {e}") from e
  n = len(ds) if limit is None else min(limit, len(ds))
  if n == 0:
    raise EvalDataError(f"{where}: no records")
  return [(f"{where}[{i}]", to_python(ds[i])) for i in range(n)]
