"""Data errors and the skip ledger: bad data either stops the run with its location or is counted, never lost."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Literal

log = logging.getLogger("phds_jax.data")

OnError = Literal["raise", "skip"]
ON_ERROR: tuple[str, ...] = ("raise", "skip")
_MAX_REASONS = 5  # reasons kept (and logged) per kind; the rest are only counted.


class DataError(ValueError):
  """A record that cannot be used; the message starts with its location (`file:line`, `file:row N`, `tfds:...`)."""


class EmptySourceError(DataError):
  """A file or dataset with no records at all (readers that word this case themselves catch it)."""


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"{name}={value!r}; expected one of {choices}")
  return value


@dataclasses.dataclass
class DataStats:
  """Counts of what the pipeline dropped or altered, by kind, with the first few reasons of each.

  Pass one to `make_dataset(stats=...)` to read them. Sources fill it when they are built (their validation scan);
  tokenization fills it as records are read, so with prefetching it also counts records read ahead of the consumer.
  """

  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  reasons: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"counts": self.counts, "reasons": self.reasons}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def add(self, kind: str, reason: str | None = None) -> None:
    """Counts one event of `kind`; the first few reasons are kept and logged as warnings."""
    with self._lock:
      n = self.counts[kind] = self.counts.get(kind, 0) + 1
      if reason is not None and n <= _MAX_REASONS:
        self.reasons.setdefault(kind, []).append(reason)
        more = " (further ones are only counted)" if n == _MAX_REASONS else ""
        log.warning("data: %s #%d: %s%s", kind, n, reason, more)

  def __getitem__(self, kind: str) -> int:
    return self.counts.get(kind, 0)

  def summary(self) -> str:
    if not self.counts:
      return "data: nothing skipped or truncated"
    parts = [f"{k}={v}" for k, v in sorted(self.counts.items())]
    return "data: " + ", ".join(parts)
