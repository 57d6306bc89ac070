"""The paper's protocol around the train loop: schedule units from the data, and checkpoint selection.

Schedule units (docs/method.md §1.3). The paper times its curriculum in epochs ("~93.9% of one epoch") and
the selection burn-in in steps (5,000). `resolve_units` turns `num_epochs`, `schedule.switch_at` /
`schedule.ramp` and `select.burn_in_steps` (each in its unit: 'fraction' | 'steps' | 'epochs') into the step
counts the loop uses, counting the packed rows of one epoch of the training split when an epoch-based value
needs it, and logs the derivation.

Selection (docs/method.md §1.7). After a burn-in of `select.burn_in_steps`, every `eval.every_steps` the
`Selector` scores the model: with `select.signal='mc'` by zero-shot multiple-choice accuracy on a validation
task (`select.task`, never the test items) at k_pre (`rule='best_at_kpre'`, the paper's) or averaged over
K_train (`'mean_over_k'`, Reviewer 3's); with `'loss'` by held-out SFT loss at the same k. The best step is
always checkpointed and kept; with `select.export='selected'` it, not the last step, is exported, and
`selection.json` records the step and its scores either way.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import ml_collections

from phds_jax import data as data_lib
from phds_jax import evaluation, paths
from phds_jax.training import schedule
from phds_jax.training.config_checks import TrainConfigError, host_batch, validate_select

SELECTION_FILE = "selection.json"


def _need(cond: bool, msg: str, fix: str | None = None) -> None:
  if not cond:
    raise TrainConfigError(msg, fix)


# ------------------------------------------------------------------------------------------ schedule units


def count_packed_rows(config: ml_collections.ConfigDict, tokenizer: Any) -> int:
  """Rows of one pass over the whole training split after tokenization and packing (every host counts all of
  it, unshuffled, so each derives the same step counts), packed with as many bins as the trainer packs with
  (a host's batch): fewer bins fill rows less tightly (8% more rows with one bin on the toy data)."""
  bins = config.data.get("pack_bins") or max(1, host_batch(config.batch_size))
  cfg = data_lib.as_config(config.data, batch_size=1, part="train", num_epochs=1, shuffle=False, shard_index=0,
                           shard_count=1, pack_bins=bins)
  return sum(1 for _ in data_lib.make_dataset(cfg, tokenizer))


def needs_epoch(config: ml_collections.ConfigDict) -> bool:
  s = config.schedule
  units = (s.get("switch_unit", "fraction"), s.get("ramp_unit", "fraction"),
           config.get("select", {}).get("burn_in_unit", "steps"))
  return bool(config.get("num_epochs", 0)) or "epochs" in units


def resolve_units(config: ml_collections.ConfigDict, tokenizer: Any,
                  rows_per_epoch: int | None = None) -> tuple[ml_collections.ConfigDict, str]:
  """(a copy of config with num_steps and fractional switch_at/ramp, the derivation text).

  The copy is what the loop and its checkpoints see, so a resume compares resolved values. `rows_per_epoch`
  skips the count (tests, or a count known from an earlier run).
  """
  s = config.schedule
  for unit_field in ("switch_unit", "ramp_unit"):
    _need(s.get(unit_field, "fraction") in schedule.UNITS,
          f"schedule.{unit_field}={s.get(unit_field)!r} is not one of {schedule.UNITS}")
  epochs = float(config.get("num_epochs", 0) or 0)
  _need(epochs >= 0, f"num_epochs={epochs} must be >= 0 (0: use num_steps)")
  if rows_per_epoch is None and needs_epoch(config):
    rows_per_epoch = count_packed_rows(config, tokenizer)
    _need(rows_per_epoch > 0, f"data.path={config.data.path!r}: the training split packs into no rows")
  spe = None if rows_per_epoch is None else rows_per_epoch / config.batch_size
  try:
    num_steps = schedule.num_steps_for(config.num_steps, epochs, spe)
    switch = schedule.to_fraction(s.switch_at, s.get("switch_unit", "fraction"), num_steps, spe)
    ramp = schedule.to_fraction(s.ramp, s.get("ramp_unit", "fraction"), num_steps, spe)
  except schedule.ScheduleError as e:
    raise TrainConfigError(f"schedule: {e}") from e
  text = schedule.derivation(rows_per_epoch=rows_per_epoch, batch_size=config.batch_size, num_steps=num_steps,
                             num_epochs=epochs, switch_at=s.switch_at, switch_unit=s.get("switch_unit", "fraction"),
                             ramp=s.ramp, ramp_unit=s.get("ramp_unit", "fraction"), mode=s.mode)
  out = ml_collections.ConfigDict(config.to_dict())
  out.num_steps, out.num_epochs = num_steps, 0.0
  out.schedule.update(dict(switch_at=min(switch, 1.0), ramp=min(ramp, 1.0), switch_unit="fraction",
                           ramp_unit="fraction"))
  if "select" in config:
    unit = config.select.get("burn_in_unit", "steps")
    _need(unit in schedule.UNITS, f"select.burn_in_unit={unit!r} is not one of {schedule.UNITS}")
    try:
      burn = round(schedule.to_fraction(config.select.burn_in_steps, unit, num_steps, spe) * num_steps)
    except schedule.ScheduleError as e:
      raise TrainConfigError(f"select.burn_in_steps: {e}") from e
    out.select.update(dict(burn_in_steps=int(burn), burn_in_unit="steps"))
    text += f"; selection burn-in {burn} steps ({config.select.burn_in_steps:g} {unit})"
  return out, text


def resolve_for_run(config: ml_collections.ConfigDict, tokenizer: Any) -> tuple[ml_collections.ConfigDict, str]:
  """resolve_units with the run's own tokenizer (the one the run loaded) and data, read only when an epoch has
  to be counted (remote inputs through local copies, as the trainer reads them; paths.staged caches them)."""
  if not needs_epoch(config):
    return resolve_units(config, None)
  raw = config.to_dict()
  data = config.data.get("path")
  if data:
    files = [f for p in ([data] if isinstance(data, str) else list(data))
             for f in (paths.glob(p) if paths.is_remote(p) else [p])]
    raw["data"]["path"] = tuple(paths.staged(f) for f in files)  # a new dict: the field may be a str
  local = ml_collections.ConfigDict(raw)
  rows = count_packed_rows(local, tokenizer)
  _need(rows > 0, f"data.path={data!r}: the training split packs into no rows")
  return resolve_units(config, tokenizer, rows_per_epoch=rows)


# ------------------------------------------------------------------------------------------------ selection


def select_ks(rule: str, k_pre: int, k_train: tuple[int, ...]) -> list[int]:
  """The k a rule scores: k_pre, or K_train restricted to k <= k_pre."""
  return [k_pre] if rule == "best_at_kpre" else sorted(k for k in k_train if k <= k_pre)


class Selector:
  """Scores the model during training and keeps track of the best step (higher score is better)."""

  def __init__(self, config: ml_collections.ConfigDict, model_cfg: Any, tokenizer: Any,
               k_train: tuple[int, ...]):
    """`tokenizer`: the run's (a tokenizers.Tokenizer or evaluation.TextEncoder), used by the 'mc' signal."""
    validate_select(config)
    self.sel = config.select
    self.every, self.num_steps = config.eval.every_steps, config.num_steps
    self.ks = select_ks(self.sel.rule, model_cfg.k_pre, k_train)
    # log_ks: more k to score and log (a driver applying several rules afterwards); the score uses self.ks.
    self.scored_ks = sorted(set(self.ks) | {k for k in self.sel.get("log_ks", ()) if 1 <= k <= model_cfg.k_pre})
    self.model_cfg, self.tokenizer = model_cfg, tokenizer
    self.best_step: int | None = None
    self.best_score = -math.inf
    self.history: list[dict[str, Any]] = []
    self._task = None

  def due(self, done: int) -> bool:
    """Scored at every eval step (and the last step) after the burn-in; the last step always counts."""
    at_eval = done % self.every == 0 or done == self.num_steps
    return at_eval and (done > int(self.sel.burn_in_steps) or done == self.num_steps)

  def score(self, params: Any, val_losses: dict[int, float] | None) -> dict[str, float]:
    """Metrics-record fields for this step: select_acc_k{k} (mc) and select_score."""
    if self.sel.signal == "loss":
      if not val_losses:
        return {}
      return {"select_score": -float(sum(val_losses[k] for k in self.ks) / len(self.ks))}
    if self._task is None:
      self._task = evaluation.get_task(self.sel.task)
    task = self._task
    results = evaluation.evaluate(self.model_cfg, params, self.tokenizer, [task], ks=self.scored_ks,
                                  limit=self.sel.limit or None, batch_size=self.sel.batch_size, n_boot=20,
                                  progress=False, plots=False)
    entry = results.summary["tasks"][task.name]
    accs = {k: float(entry["by_k"][str(k)][entry["primary"]]) for k in self.scored_ks}
    return {**{f"select_acc_k{k}": v for k, v in accs.items()},
            "select_score": float(sum(accs[k] for k in self.ks) / len(self.ks))}

  def update(self, done: int, fields: dict[str, float]) -> bool:
    """Records the step's score; True when it is the best so far (ties keep the earlier step)."""
    if "select_score" not in fields or not math.isfinite(fields["select_score"]):
      return False
    self.history.append(dict(step=done, **fields))
    if fields["select_score"] > self.best_score:
      self.best_step, self.best_score = done, fields["select_score"]
      return True
    return False

  def restore(self, meta: dict) -> None:
    """The best so far from a resumed checkpoint's metadata."""
    if meta.get("select_best_step") is not None:
      self.best_step, self.best_score = int(meta["select_best_step"]), float(meta["select_best_score"])
      self.history = list(meta.get("select_history", []))

  def meta(self) -> dict[str, Any]:
    return dict(select_best_step=self.best_step, select_best_score=None if self.best_step is None else
                self.best_score, select_history=self.history)

  def write(self, workdir: str, exported_step: int) -> None:
    info = dict(signal=self.sel.signal, rule=self.sel.rule, task=self.sel.task, ks=self.ks,
                burn_in_steps=int(self.sel.burn_in_steps), export=self.sel.export, selected_step=self.best_step,
                selected_score=None if self.best_step is None else self.best_score, exported_step=exported_step,
                history=self.history,
                note="select_score: mean accuracy over ks (mc) or minus the mean held-out loss (loss)")
    paths.write_text(paths.join(workdir, SELECTION_FILE), json.dumps(info, indent=1) + "\n")
    logging.info("selection (%s, %s): best step %s (score %.4f), exported step %d", self.sel.signal,
                 self.sel.rule, self.best_step, self.best_score, exported_step)
