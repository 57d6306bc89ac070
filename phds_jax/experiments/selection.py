"""Which intermediate checkpoint a run reports (docs/method.md §1.7), from the trainer's metrics.jsonl.

The paper (as summarised, docs/method.md §1.7) skips a burn-in (5,000 steps) and takes the checkpoint with the
best multiple-choice validation accuracy at k_pre; Reviewer 3 asks for the mean over the target k range
instead. Both rules are here, over either signal the trainer logs (training/protocol.py):
  'mc'    select_acc_k{k}: accuracy on a validation MC task (never the test items), higher is better;
  'loss'  val_loss_k{k}: held-out SFT loss (hard routing), lower is better.
The burn-in is a step count, as reported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

ValByStep = dict[int, dict[int, float]]  # step -> k -> signal value

SIGNALS = {"mc": (re.compile(r"^select_acc_k(\d+)$"), True), "loss": (re.compile(r"^val_loss_k(\d+)$"), False)}


def val_by_step(records: Iterable[Mapping], signal: str = "loss") -> ValByStep:
  """step -> {k: value} for every logged record that carries the signal's per-k values."""
  key, _ = SIGNALS[signal]
  out: ValByStep = {}
  for r in records:
    ks = {int(m.group(1)): float(v) for name, v in r.items() if (m := key.match(name))}
    if ks:
      out[int(r["step"])] = ks
  return out


def candidates(steps: Iterable[int], burn_in_steps: int) -> list[int]:
  """Steps after the burn-in; the last step if the burn-in leaves none."""
  steps = sorted(set(steps))
  if not steps:
    raise ValueError("no evaluated steps to select from (is eval.every_steps > num_steps?)")
  after = [s for s in steps if s > burn_in_steps]
  return after or steps[-1:]


def rule_ks(rule: str, k_pre: int, ks: Sequence[int]) -> list[int]:
  """The k a rule reads: k_pre, or `ks` restricted to k <= k_pre (mean over the target range)."""
  if rule == "best_at_kpre":
    return [k_pre]
  if rule == "mean_over_k":
    use = sorted(k for k in ks if k <= k_pre)
    if not use:
      raise ValueError(f"no selection k in {tuple(ks)} is <= k_pre={k_pre}")
    return use
  raise ValueError(f"unknown selection rule {rule!r}")


def score(values: Mapping[int, float], rule: str, k_pre: int, ks: Sequence[int]) -> float:
  """The rule's quantity (in the signal's units): the value at k_pre, or the mean over the rule's k."""
  use = rule_ks(rule, k_pre, ks)
  return sum(values[k] for k in use) / len(use)


def select_step(vals: ValByStep, rule: str, *, k_pre: int, ks: Sequence[int], burn_in_steps: int,
                signal: str = "loss", available: Iterable[int] | None = None) -> int:
  """The post-burn-in step with the best score (lowest loss / highest accuracy); ties go to the earlier step.

  `available` restricts the choice to steps whose checkpoint still exists (None: all evaluated steps).
  Non-finite scores (a diverged evaluation) never win.
  """
  higher = SIGNALS[signal][1]
  steps = set(vals) if available is None else set(vals) & set(available)
  pool = candidates(steps, burn_in_steps)
  scored = [((-1 if higher else 1) * score(vals[s], rule, k_pre, ks), s) for s in pool]
  finite = [x for x in scored if math.isfinite(x[0])] or scored
  return min(finite)[1]


def select_all(vals: ValByStep, rules: Sequence[str], **kw) -> dict[str, int]:
  """rule -> selected step, for each rule."""
  return {rule: select_step(vals, rule, **kw) for rule in rules}
