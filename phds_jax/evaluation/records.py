"""Evaluation records, read through the data layer's sources (phds_jax.data.sources), with their location.

Every record comes back as `(location, doc)`: `location` (`file.jsonl:12` 1-based line, `file.parquet: row 3`
0-based, `file.json: item 2`, `tfds:name/split[7]`, a `.txt` file's name) is its id in the per-sample files and
the prefix of every error about it, named the same way as in training. Records are read raw (`fmt="raw"`: plain
Python, each task parses its own schema) and lazily (`validate=False`), so `limit` reads only the first records.
tfds is read with `tfds.data_source(..., download=False)` only: a dataset must already be prepared
(array_record) under `data_dir`; nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from phds_jax import errors
from phds_jax.data.errors import DataError, EmptySourceError
from phds_jax.data.formats import RAW, to_python
from phds_jax.data.sources import EXACT, open_source

__all__ = ["Doc", "EvalDataError", "Located", "need", "read_file", "read_tfds", "to_python"]

Doc = dict[str, Any]
Located = tuple[str, Doc]


class EvalDataError(errors.UserError, DataError):
  """Unusable evaluation data; the message starts with where it is (file:line, file: row N, tfds:...[i])."""


def need(doc: Mapping[str, Any], key: str, where: str, task: str) -> Any:
  """`doc[key]`, or an error naming the record, the task and the fields it does have."""
  if not isinstance(doc, Mapping):
    raise EvalDataError(f"{where}: {task}: expected a JSON object, got {type(doc).__name__}")
  if key not in doc or doc[key] is None:
    raise EvalDataError(f"{where}: {task}: missing field {key!r} (record has: {', '.join(sorted(doc))})")
  return doc[key]


def _first(source: Any, limit: int | None) -> list[Located]:
  """(location, record) of the first `limit` records; the location travels beside the record, not in it."""
  out = []
  for i in range(len(source) if limit is None else min(limit, len(source))):
    doc = source[i]
    out.append((doc.pop("_id"), doc))
  return out


def read_file(path: str | os.PathLike, limit: int | None = None) -> list[Located]:
  """Records of a local .jsonl / .json / .parquet file (a .txt file is one document), in file order (the first
  `limit` of them); empty files are an error."""
  path = os.fspath(path)
  try:
    return _first(open_source(path, fmt=RAW, validate=False, text_unit=EXACT), limit)
  except EmptySourceError as e:
    raise EvalDataError(f"{path}: no records (empty file)") from e
  except EvalDataError:
    raise
  except DataError as e:
    raise EvalDataError(str(e)) from e


def read_tfds(name: str, split: str, data_dir: str | None, limit: int | None = None) -> list[Located]:
  """The first `limit` records of a prepared tfds dataset, decoded to plain Python."""
  try:
    return _first(open_source(fmt=RAW, validate=False, tfds_name=name, split=split, data_dir=data_dir), limit)
  except EmptySourceError as e:
    raise EvalDataError(f"tfds:{name}/{split}: no records") from e
  except DataError as e:
    raise EvalDataError(str(e), fix="prepare the dataset under --data_dir, or pass a local file as TASK:PATH") from e
