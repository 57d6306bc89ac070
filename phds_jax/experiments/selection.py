"""Which intermediate checkpoint a run reports (docs/method.md §1.7), from the trainer's metrics.jsonl.

The paper skips a burn-in (5,000 steps) and takes the checkpoint with the best validation score at k_pre;
Reviewer 3 asks for the mean over the target k range instead. Both rules are here. The validation signal is
the trainer's held-out SFT loss per k (hard routing; `val_loss_k{k}` records, lower is better): it is logged
for free at every checkpoint and comes from the SFT split, never from the multiple-choice items the
comparison reports, so selection does not peek at the test set.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

ValByStep = dict[int, dict[int, float]]  # step -> k -> held-out loss

_KEY = re.compile(r"^val_loss_k(\d+)$")


def val_by_step(records: Iterable[Mapping]) -> ValByStep:
  """step -> {k: held-out loss} for every logged record that carries per-k validation losses."""
  out: ValByStep = {}
  for r in records:
    ks = {int(m.group(1)): float(v) for key, v in r.items() if (m := _KEY.match(key))}
    if ks:
      out[int(r["step"])] = ks
  return out


def candidates(steps: Iterable[int], num_steps: int, burn_in: float) -> list[int]:
  """Steps after the burn-in (a fraction of training); the last step if the burn-in leaves none."""
  steps = sorted(set(steps))
  if not steps:
    raise ValueError("no evaluated steps to select from (is eval.every_steps > num_steps?)")
  after = [s for s in steps if s > burn_in * num_steps]
  return after or steps[-1:]


def score(losses: Mapping[int, float], rule: str, k_pre: int, ks: Sequence[int]) -> float:
  """The quantity a rule minimises: loss at k_pre, or the mean loss over `ks` (restricted to k <= k_pre)."""
  if rule == "best_at_kpre":
    return losses[k_pre]
  if rule == "mean_over_k":
    use = [k for k in ks if k <= k_pre]
    if not use:
      raise ValueError(f"no selection k in {tuple(ks)} is <= k_pre={k_pre}")
    return sum(losses[k] for k in use) / len(use)
  raise ValueError(f"unknown selection rule {rule!r}")


def select_step(vals: ValByStep, rule: str, *, k_pre: int, ks: Sequence[int], num_steps: int,
                burn_in: float, available: Iterable[int] | None = None) -> int:
  """The post-burn-in step with the lowest score; ties go to the earlier step.

  `available` restricts the choice to steps whose checkpoint still exists (None: all evaluated steps).
  Non-finite scores (a diverged evaluation) never win.
  """
  steps = set(vals) if available is None else set(vals) & set(available)
  pool = candidates(steps, num_steps, burn_in)
  scored = [(score(vals[s], rule, k_pre, ks), s) for s in pool]
  finite = [x for x in scored if math.isfinite(x[0])] or scored
  return min(finite)[1]


def select_all(vals: ValByStep, rules: Sequence[str], **kw) -> dict[str, int]:
  """rule -> selected step, for each rule."""
  return {rule: select_step(vals, rule, **kw) for rule in rules}
