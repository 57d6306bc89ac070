"""The Grain input pipeline: records -> shuffled, tokenized, packed, fixed-shape numpy batches.

    source -> [held-out part] -> shard (host slice) -> shuffle(seed, reshuffled each epoch) -> repeat(num_epochs)
           -> tokenize + loss mask -> pack rows of length L -> batch B rows

Every batch is

    tokens      int32[B, L]    input ids (0 on padding)
    targets     int32[B, L]    next token within the same example (0 where there is none)
    loss_mask   float32[B, L]  1 where the target is trained (assistant tokens / all text tokens), else 0
    segment_ids int32[B, L]    1.. = which packed example of the row, 0 = padding
    positions   int32[B, L]    position within the example (restarts at 0 for each segment)

Packing never splits an example across rows, so attention must be restricted to equal `segment_ids` and the
loss normalized by `loss_mask.sum()`. The last batch of a finite run is padded with empty rows to keep the shape.
The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` (a JSON-able dict; Orbax saves it with
`grain.checkpoint.CheckpointSave(iterator)`) resume exactly at the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from phds_jax.data.errors import ON_ERROR, DataError, DataStats, check_choice
from phds_jax.data.formats import FORMATS
from phds_jax.data.sources import TEXT_UNITS, holdout_split, open_source
from phds_jax.data.tokenize import OVERLONG, ChatTokenizer, Tokenize, resolve_template

PACKINGS: tuple[str, ...] = ("first_fit", "best_fit", "none")
PARTS: tuple[str, ...] = ("train", "validation")
BATCH_SPEC: dict[str, Any] = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
                              "segment_ids": np.int32, "positions": np.int32}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Data pipeline settings (plain kwargs, a dict or an `ml_collections.ConfigDict` with these keys work too)."""

  path: str | tuple[str, ...] | None = None  # .jsonl / .json / .parquet / .txt files or globs, in order.
  format: str = "auto"  # "auto" | "chat" | "instruction" | "text" (see formats.py).
  fields: Mapping[str, str] = dataclasses.field(default_factory=dict)  # canonical name -> record key.
  text_unit: str = "file"  # .txt documents: "file" or "blank_line" (blocks).
  tfds_name: str | None = None  # read a prepared tfds dataset instead of `path`.
  split: str = "train"  # tfds split (slicing syntax allowed, e.g. "train[:90%]").
  data_dir: str | None = None  # tfds data_dir.
  max_len: int = 2048  # L: packed row length (and the longest example).
  batch_size: int = 8  # B: rows per batch (per host).
  seed: int = 0  # shuffle seed; each epoch is reshuffled deterministically from it.
  shuffle: bool = True
  num_epochs: int | None = 1  # None = repeat forever.
  on_error: str = "raise"  # bad records: "raise" (DataError naming file:line) or "skip" (counted, logged).
  validate: bool = True  # parse every record when the source is built (exact counts, fail before training).
  overlong: str = "error"  # examples longer than max_len: "error" | "truncate" | "skip".
  template: str = "auto"  # chat template: "auto" | "checkpoint" | "tulu" | "chatml" | Jinja source | .jinja path.
  packing: str = "first_fit"  # "first_fit" | "best_fit" | "none" (one example per row).
  pack_bins: int | None = None  # rows packed at once (default batch_size); more = less padding, more buffering.
  validation_fraction: float = 0.0  # records held out for evaluation (by record-index hash).
  holdout_seed: int = 0  # seed of the held-out split; keep it fixed between the train and eval pipelines.
  part: str = "train"  # which side of the held-out split to read: "train" | "validation".
  shard_index: int | None = None  # this host's shard; default jax.process_index().
  shard_count: int | None = None  # default jax.process_count().
  num_threads: int = 4  # grain reader threads (tokenization; 0 = inline); order stays deterministic.
  prefetch: int = 64  # grain prefetch buffer (records).

  def __post_init__(self):
    check_choice("format", self.format, FORMATS)
    check_choice("text_unit", self.text_unit, TEXT_UNITS)
    check_choice("on_error", self.on_error, ON_ERROR)
    check_choice("overlong", self.overlong, OVERLONG)
    check_choice("packing", self.packing, PACKINGS)
    check_choice("part", self.part, PARTS)
    if self.max_len < 2 or self.batch_size < 1:
      raise ValueError(f"need max_len >= 2 and batch_size >= 1, got {self.max_len}, {self.batch_size}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs={self.num_epochs} must be >= 1 or None (forever)")
    if self.path is None and self.tfds_name is None:
      raise ValueError("set `path` (files) or `tfds_name`")


def as_config(config: Any = None, **overrides: Any) -> DataConfig:
  """DataConfig from a DataConfig, a mapping, an `ml_collections.ConfigDict`, or nothing, plus overrides."""
  if isinstance(config, DataConfig):
    return dataclasses.replace(config, **overrides)
  if config is not None and hasattr(config, "to_dict"):
    config = config.to_dict()
  values = {**dict(config or {}), **overrides}
  known = {f.name for f in dataclasses.fields(DataConfig)}
  if unknown := sorted(set(values) - known):
    raise ValueError(f"unknown data config fields {unknown}; known: {sorted(known)}")
  if isinstance(values.get("path"), (list, tuple)):
    values["path"] = tuple(values["path"])
  return DataConfig(**values)


def _shard(cfg: DataConfig) -> tuple[int, int]:
  index, count = cfg.shard_index, cfg.shard_count
  if index is None or count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only here: the data layer needs jax for nothing else)
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f"shard_index={index} must be in [0, shard_count={count})")
  return index, count


def _tokenizer(tokenizer: ChatTokenizer | str, cfg: DataConfig) -> ChatTokenizer:
  if isinstance(tokenizer, str):
    return ChatTokenizer.from_dir(tokenizer, template=cfg.template)
  if cfg.template != "auto":  # An explicit choice overrides the tokenizer's (its own counts as the checkpoint's).
    source = resolve_template(cfg.template, tokenizer.template, tokenizer.tokenizer.get_vocab())
    return dataclasses.replace(tokenizer, template=source)
  return tokenizer


def load_source(cfg: DataConfig, stats: DataStats | None = None) -> Any:
  """The configured records, restricted to `cfg.part` of the held-out split (before any sharding)."""
  source = open_source(cfg.path, fmt=cfg.format, fields=cfg.fields, on_error=cfg.on_error, validate=cfg.validate,
                       text_unit=cfg.text_unit, tfds_name=cfg.tfds_name, split=cfg.split, data_dir=cfg.data_dir,
                       stats=stats)
  if cfg.validation_fraction > 0:
    train, validation = holdout_split(source, cfg.validation_fraction, cfg.holdout_seed)
    source = train if cfg.part == "train" else validation
  elif cfg.part == "validation":
    raise ValueError("part='validation' needs validation_fraction > 0")
  if not len(source):
    raise DataError(f"no records in part {cfg.part!r} (validation_fraction={cfg.validation_fraction})")
  return source


def _row(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Grain's packed row (`tokens_segment_ids`, ...) -> our names and dtypes."""
  out = {k: packed[k] for k in ("tokens", "targets", "loss_mask")}
  out["segment_ids"] = packed["tokens_segment_ids"]
  out["positions"] = packed["tokens_positions"]
  return {k: np.asarray(v, BATCH_SPEC[k]) for k, v in out.items()}


def _stack(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int, row_len: int) -> dict[str, np.ndarray]:
  """Rows -> one batch, padded with empty rows (segment 0, mask 0) up to `batch_size`."""
  batch = {k: np.zeros((batch_size, row_len), dtype) for k, dtype in BATCH_SPEC.items()}
  for i, row in enumerate(rows):
    for k in batch:
      batch[k][i] = row[k]
  return batch


def _pack(ds: grain.IterDataset, cfg: DataConfig) -> grain.IterDataset:
  pack_cls = (grain.experimental.BestFitPackIterDataset if cfg.packing == "best_fit"
              else grain.experimental.FirstFitPackIterDataset)
  length = {"tokens": cfg.max_len, "targets": cfg.max_len, "loss_mask": cfg.max_len}
  return pack_cls(ds, length_struct=length, num_packing_bins=cfg.pack_bins or cfg.batch_size, shuffle_bins=False,
                  max_sequences_per_bin=1 if cfg.packing == "none" else None)


def build_dataset(config: Any = None, tokenizer: ChatTokenizer | str | None = None, *, source: Any = None,
                  stats: DataStats | None = None, **overrides: Any) -> grain.IterDataset:
  """The pipeline as a `grain.IterDataset` (each `iter()` starts from the beginning).

  `config`: DataConfig / dict / ConfigDict (+ `overrides`). `tokenizer`: a ChatTokenizer or a checkpoint dir.
  `source`: records to use instead of `config.path` (any random-access sequence of normalized records).
  `stats`: receives the counts of skipped / truncated records.
  """
  cfg = as_config(config, **overrides)
  if tokenizer is None:
    raise ValueError("a tokenizer (ChatTokenizer or checkpoint directory) is required")
  stats = stats if stats is not None else DataStats()
  tok = _tokenizer(tokenizer, cfg)
  records = source if source is not None else load_source(cfg, stats)
  index, count = _shard(cfg)
  ds = grain.MapDataset.source(records)
  if count > 1:
    ds = ds[index::count]
    if not len(ds):
      raise DataError(f"shard {index} of {count} has no records ({len(records)} in all)")
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  if cfg.num_epochs != 1:
    ds = ds.repeat(cfg.num_epochs)
  ds = ds.map(Tokenize(tok, cfg.max_len, cfg.overlong, stats, cfg.on_error))
  read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
  it = _pack(ds.to_iter_dataset(read), cfg).map(_row)
  return it.batch(cfg.batch_size, batch_fn=functools.partial(_stack, batch_size=cfg.batch_size, row_len=cfg.max_len))


def make_dataset(config: Any = None, tokenizer: ChatTokenizer | str | None = None, *, source: Any = None,
                 stats: DataStats | None = None, **overrides: Any) -> grain.DatasetIterator:
  """A checkpointable iterator of batches (see the module docstring); arguments as `build_dataset`.

  For held-out loss: `make_dataset(cfg, tok, part="validation", num_epochs=1, shuffle=False)` with the same
  `validation_fraction` / `holdout_seed` as training.
  """
  return iter(build_dataset(config, tokenizer, source=source, stats=stats, **overrides))
