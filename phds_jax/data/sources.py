"""Random-access record sources (grain `RandomAccessDataSource`): JSONL, parquet, text files and tfds.

Random access (rather than streaming) is what makes shuffling, sharding and resuming exact: the pipeline only
ever asks for record `i`. Every source yields *normalized* records, one of

    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "_id": "file.jsonl:12"}
    {"text": str, "_id": "notes.txt:1"}

`_id` names where the record came from, so every later error (e.g. an over-long example) can point at it.
The input formats (`chat`, `instruction`, `text`, `auto`) and the `fields` renaming are described in formats.py.

Validation: by default a source parses every record once when it is built (`validate=True`), so bad data stops
the run before training starts (`on_error="raise"`) or is dropped from the index and counted up front
(`on_error="skip"`), which keeps `len()` exact. With `validate=False` only line offsets are indexed (fast for huge
files); bad records then raise at access time, or in skip mode come back as `None` (which grain filters out) and
are counted when read. Either way errors name `file:line` (JSONL, text; 1-based), `file: row N` (parquet, 0-based),
`file: item N` (JSON array, 0-based) or `tfds:name/split[N]`.

JSONL files are indexed by byte offsets and read with `os.pread` (thread-safe, nothing held in memory); parquet
files are held as one memory-mapped Arrow table; `.txt` files give one document per file (`text_unit="file"`,
the natural unit for perplexity / pretraining text) or one per blank-line-separated block (`"blank_line"`).

Evaluation reads its task records through these same sources with `fmt="raw"` (each record as plain Python, for
the task's own parser) and `text_unit="exact"` (a `.txt` file byte for byte, located by its name: perplexity
counts every byte), so a bad line is reported the same way in training and evaluation.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phds_jax.data.errors import ON_ERROR, DataError, DataStats, EmptySourceError, OnError, check_choice, log
from phds_jax.data.formats import RAW, SOURCE_FORMATS, normalize

TEXT_UNITS: tuple[str, ...] = ("file", "blank_line")  # the training data's choices
EXACT = "exact"  # the whole file unstripped, as one record located by the file name (evaluation's perplexity)
_OPEN_LOCK = threading.Lock()  # Grain reads from several threads; open each file / table once.


# --------------------------------------------------------------------------------------------- sources


class RecordSource:
  """Base: normalized records by index over the usable raw records (`_keys`)."""

  name: str = "source"

  def __init__(self, fmt: str, fields: Mapping[str, str] | None, on_error: OnError, stats: DataStats | None):
    self.fmt = check_choice("format", fmt, SOURCE_FORMATS)
    self.fields = dict(fields or {})
    self.on_error = check_choice("on_error", on_error, ON_ERROR)
    self.stats = stats if stats is not None else DataStats()
    self._keys = np.zeros((0,), np.int64)

  def _raw(self, key: int) -> Any:
    raise NotImplementedError

  def _where(self, key: int) -> str:
    raise NotImplementedError

  def _record(self, key: int) -> dict[str, Any] | None:
    where = self._where(key)
    try:
      rec = normalize(self._raw(key), self.fmt, self.fields)
    except (ValueError, TypeError, KeyError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
      msg = f"{where}: {e}"
      if self.on_error == "raise":
        raise DataError(msg) from e
      self.stats.add("bad_record", msg)
      return None
    rec["_id"] = where
    return rec

  def _set_keys(self, keys: Sequence[int], validate: bool) -> None:
    """Indexes the usable records; the validation scan raises on or counts every bad one now."""
    if not len(keys):
      raise EmptySourceError(f"{self.name}: empty (no records)")
    if validate:
      keys = [k for k in keys if self._record(k) is not None]
      if not keys:
        raise DataError(f"{self.name}: no usable records (all skipped, see the warnings)")
    self._keys = np.asarray(keys, np.int64)

  def __len__(self) -> int:
    return len(self._keys)

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    return self._record(int(self._keys[index]))

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {len(self)} records)"


class _FileSource(RecordSource):
  """A source backed by one file, read with `os.pread` from a lazily opened descriptor (fork/pickle safe)."""

  def __init__(self, path: str, **kw):
    super().__init__(**kw)
    self.path = self.name = str(path)
    self._fd: int | None = None

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}

  def _pread(self, start: int, end: int) -> bytes:
    if self._fd is None:
      with _OPEN_LOCK:
        if self._fd is None:
          self._fd = os.open(self.path, os.O_RDONLY)
    return os.pread(self._fd, end - start, start)

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)


class JsonlSource(_FileSource):
  """One JSON object per line; blank lines are ignored. Only byte offsets are kept in memory."""

  def __init__(self, path: str, fmt: str = "auto", fields: Mapping[str, str] | None = None, on_error: OnError = "raise",
               validate: bool = True, stats: DataStats | None = None):
    super().__init__(path, fmt=fmt, fields=fields, on_error=on_error, stats=stats)
    starts, lines, pos = [], [], 0
    with open(self.path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          starts.append(pos)
          lines.append(lineno)
        pos += len(line)
    ends = starts[1:] + [pos] if starts else []
    self._spans = np.asarray([starts, ends], np.int64).reshape(2, -1)
    self._lines = np.asarray(lines, np.int64)
    self._set_keys(range(len(starts)), validate)

  def _where(self, key: int) -> str:
    return f"{self.path}:{self._lines[key]}"

  def _raw(self, key: int) -> Any:
    try:
      return json.loads(self._pread(*self._spans[:, key]))
    except json.JSONDecodeError as e:  # the line is in the location already; the column is what helps
      raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from e


class JsonArraySource(RecordSource):
  """A `.json` file holding one array of records (alpaca, CommonSense170K); loaded whole, so keep these small."""

  def __init__(self, path: str, fmt: str = "auto", fields: Mapping[str, str] | None = None, on_error: OnError = "raise",
               validate: bool = True, stats: DataStats | None = None):
    super().__init__(fmt=fmt, fields=fields, on_error=on_error, stats=stats)
    self.path = self.name = str(path)
    try:
      with open(self.path, encoding="utf-8") as f:
        self._items = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{self.path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(self._items, list):
      raise DataError(f"{self.path}: expected a JSON array of records, got {type(self._items).__name__}")
    self._set_keys(range(len(self._items)), validate)

  def _where(self, key: int) -> str:
    return f"{self.path}: item {key}"

  def _raw(self, key: int) -> Any:
    return self._items[key]


def _is_json_array(path: str) -> bool:
  """`.json` files are either one array or, as often on the Hub, JSON lines."""
  with open(path, "rb") as f:
    head = f.read(4096).lstrip()
  return head.startswith(b"[")


class TextFileSource(_FileSource):
  """Plain text: the whole file is one document (`unit="file"`) or each blank-line-separated block is one;
  `unit="exact"` keeps the whole file unstripped (even empty) as one record named by the file alone."""

  def __init__(self, path: str, unit: str = "file", on_error: OnError = "raise", validate: bool = True,
               stats: DataStats | None = None, fmt: str = "text"):
    super().__init__(path, fmt=check_choice("format", fmt, ("text", RAW)), fields=None, on_error=on_error,
                     stats=stats)
    self.unit = check_choice("text_unit", unit, TEXT_UNITS + (EXACT,))
    if unit == EXACT:
      self._spans = np.asarray([[0, os.path.getsize(self.path)]], np.int64)
      self._lines = np.zeros((1,), np.int64)
      self._set_keys([0], validate)
      return
    spans, lines, pos, start, start_line = [], [], 0, None, 0
    with open(self.path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        blank = not line.strip()
        if start is None and not blank:
          start, start_line = pos, lineno
        elif start is not None and blank and unit == "blank_line":
          spans.append((start, pos))
          lines.append(start_line)
          start = None
        pos += len(line)
    if start is not None:
      spans.append((start, pos))
      lines.append(start_line)
    self._spans = np.asarray(spans, np.int64).reshape(-1, 2)
    self._lines = np.asarray(lines, np.int64)
    self._set_keys(range(len(spans)), validate)

  def _where(self, key: int) -> str:
    return self.path if self.unit == EXACT else f"{self.path}:{self._lines[key]}"

  def _raw(self, key: int) -> Any:
    text = self._pread(*self._spans[key]).decode("utf-8")
    return {"text": text if self.unit == EXACT else text.strip("\n")}


class ParquetSource(RecordSource):
  """A parquet file held as a memory-mapped Arrow table (columnar, so far smaller than Python objects)."""

  def __init__(self, path: str, fmt: str = "auto", fields: Mapping[str, str] | None = None, on_error: OnError = "raise",
               validate: bool = True, stats: DataStats | None = None):
    super().__init__(fmt=fmt, fields=fields, on_error=on_error, stats=stats)
    self.path = self.name = str(path)
    self._table = None
    self._set_keys(range(self._load().num_rows), validate)

  def _load(self):
    if self._table is None:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (optional and slow: parquet only)
      with _OPEN_LOCK:
        try:
          if self._table is None:
            self._table = pq.read_table(self.path, memory_map=True)
        except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types.
          raise DataError(f"{self.path}: cannot read parquet: {e}") from e
    return self._table

  def __getstate__(self):
    return {**self.__dict__, "_table": None}

  def _where(self, key: int) -> str:
    return f"{self.path}: row {key}"

  def _raw(self, key: int) -> Any:
    return self._load().slice(key, 1).to_pylist()[0]


class TfdsSource(RecordSource):
  """A prepared tfds dataset (ArrayRecord files in `data_dir`), read with `tfds.data_source`, never downloaded."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None, fmt: str = "auto",
               fields: Mapping[str, str] | None = None, on_error: OnError = "raise", validate: bool = True,
               stats: DataStats | None = None):
    super().__init__(fmt=fmt, fields=fields, on_error=on_error, stats=stats)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (optional, imports TF: tfds only)
    self.name = f"tfds:{name}/{split}"
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises a variety of not-found / format errors.
      raise DataError(f"{self.name}: cannot open (data_dir={data_dir!r}; it must hold the prepared dataset in "
                      f"array_record format): {e}") from e
    self._set_keys(range(len(self._ds)), validate)

  def _where(self, key: int) -> str:
    return f"{self.name}[{key}]"

  def _raw(self, key: int) -> Any:
    return self._ds[key]


class ConcatSource:
  """Several sources as one, in order (e.g. the parquet shards of one dataset)."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self.sources]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> Any:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    i = bisect.bisect_right(self._ends, index)
    return self.sources[i][index - (self._ends[i - 1] if i else 0)]

  def __repr__(self) -> str:
    return f"ConcatSource({self.sources!r})"


class SubsetSource:
  """The records of `source` at `indices` (a held-out split, a debugging subset)."""

  def __init__(self, source: Any, indices: Sequence[int]):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]

  def __repr__(self) -> str:
    return f"SubsetSource({self.source!r}, {len(self)} records)"


# --------------------------------------------------------------------------------------------- helpers


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A fixed integer hash (same on every machine and numpy version), to split by record index."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def holdout_mask(num_records: int, validation_fraction: float, seed: int = 0) -> np.ndarray:
  """bool[num_records]: True for held-out records, chosen by a hash of (record index, seed).

  Stable for as long as the list of usable records is: the same records are held out on every host and restart.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
  index = np.arange(num_records, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x100000001B3)
  u = (_splitmix64(index) >> np.uint64(11)).astype(np.float64) / float(2**53)
  return u < validation_fraction


def holdout_split(source: Any, validation_fraction: float, seed: int = 0) -> tuple[SubsetSource, SubsetSource]:
  """(train, validation) subsets of `source`, disjoint and covering, by `holdout_mask`."""
  held = holdout_mask(len(source), validation_fraction, seed)
  return SubsetSource(source, np.flatnonzero(~held)), SubsetSource(source, np.flatnonzero(held))


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Paths or glob patterns -> sorted, de-duplicated file list (a pattern matching nothing is an error)."""
  out: list[str] = []
  for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
    p = os.fspath(p)
    found = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    if not found:
      raise DataError(f"{p}: no files match")
    out += [f for f in found if f not in out]
  return out


def open_source(paths: str | Sequence[str] | None = None, *, fmt: str = "auto", fields: Mapping[str, str] | None = None,
                on_error: OnError = "raise", validate: bool = True, text_unit: str = "file",
                tfds_name: str | None = None, split: str = "train", data_dir: str | None = None,
                stats: DataStats | None = None) -> Any:
  """Files (`.jsonl`, `.json` array or lines, `.parquet`, `.txt`; globs ok) or a tfds dataset -> one source."""
  stats = stats if stats is not None else DataStats()
  kw = dict(on_error=on_error, validate=validate, stats=stats)
  if tfds_name:
    return TfdsSource(tfds_name, split=split, data_dir=data_dir, fmt=fmt, fields=fields, **kw)
  if not paths:
    raise ValueError("give data paths or a tfds dataset name")
  sources = []
  for path in expand_paths(paths):
    if not path.endswith((".jsonl", ".json", ".parquet", ".txt")):  # before existence: a typo'd type says so
      raise DataError(f"{path}: unknown file type; expected .jsonl, .json, .parquet or .txt")
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such file")
    if path.endswith(".json") and _is_json_array(path):
      sources.append(JsonArraySource(path, fmt=fmt, fields=fields, **kw))
    elif path.endswith((".jsonl", ".json")):
      sources.append(JsonlSource(path, fmt=fmt, fields=fields, **kw))
    elif path.endswith(".parquet"):
      sources.append(ParquetSource(path, fmt=fmt, fields=fields, **kw))
    else:
      sources.append(TextFileSource(path, unit=text_unit, fmt=RAW if fmt == RAW else "text", **kw))
  if stats["bad_record"]:
    log.warning("data: skipped %d bad records in %s", stats["bad_record"], paths)
  return sources[0] if len(sources) == 1 else ConcatSource(sources)
