"""Orbax checkpoints of a training run: state, data-iterator position and run metadata in one step folder.

Orbax writes each step into a temporary folder and renames it only when complete, so a save interrupted
midway (even by SIGKILL) is never listed, never restored from, and never replaces a finished one. The
manager keeps the latest `keep` steps plus the best one by the held-out metric.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class RunCheckpointer:
  """Saves/restores (TrainState, data iterator state, metadata JSON) under `directory`."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str | None = "val_loss",
               async_save: bool = True):
    preserve = [policies.LatestN(n=keep)]
    if best_metric:
      preserve.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        preservation_policy=policies.AnyPreservationPolicy(preserve))
    self.best_metric = best_metric
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, meta: dict, metrics: dict | None = None) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                              meta=ocp.args.JsonSave(meta))
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    self.manager.save(step, args=args, metrics=metrics)

  def restore(self, step: int, target_state: Any, data_iter: Any) -> tuple[Any, dict]:
    """Restores into `target_state`'s structure and shardings; moves `data_iter` to the saved position."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state), data=grain.checkpoint.CheckpointRestore(data_iter),
        meta=ocp.args.JsonRestore()))
    logging.info("restored checkpoint step %d from %s", step, self.manager.directory)
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
