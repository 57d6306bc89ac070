"""The results of an evaluation: what `runner.evaluate` returns and `report` writes and reads back."""

from __future__ import annotations

import dataclasses
from typing import Any

Record = dict[str, Any]  # one item's per-sample record (samples/{task}_k{k}.jsonl)


@dataclasses.dataclass
class EvalResults:
  """`summary` is JSON-ready (results.json); `samples[task][k]` are the per-item records (samples/*.jsonl)."""

  summary: dict[str, Any]
  samples: dict[str, dict[int, list[Record]]]

  def metric(self, task: str, k: int, name: str | None = None) -> float:
    entry = self.summary["tasks"][task]
    return entry["by_k"][str(k)][name or entry["primary"]]
