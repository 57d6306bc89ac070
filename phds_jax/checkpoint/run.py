"""Verified Orbax checkpoints of a training run: state, data-iterator position, metadata and a manifest.

Orbax writes each step into a temporary folder and renames it only when complete, so a save interrupted
midway (even by SIGKILL) is never listed. That guards against torn writes, not against what happens to the
files later (truncation, flipped bits) or against saving garbage. So each step also holds a manifest: a CRC32,
shape and dtype per array, computed from the in-memory state at save time (a state with a non-finite value
is refused). Restoring recomputes the checksums of what was read: a step that fails to read or to match is
reported (which step, why), moved to `<workdir>/checkpoints_bad/`, and the next older step is tried.

Old steps are deleted by this class, not by Orbax, and only once a newer step is complete and (with
`verify=True`) read back and matched against its manifest; the latest `keep` good steps and the best one by
the held-out metric are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from phds_jax import errors, paths
from phds_jax.checkpoint.manifest import abstract_state, compare_manifests, manifest_of, shape_differences



class ResumeError(errors.UserError):
  """The checkpoint in the workdir cannot be resumed with this config (shapes, structure, settings)."""


class CheckpointSaveError(errors.UserError):
  """A save failed (disk full, permissions); older checkpoints are untouched."""


class BadCheckpoint(Exception):
  """A step whose files cannot be read or do not match its manifest."""


class _QuietPartialRestore(logging.Filter):
  """Orbax warns for every item a Composite restore leaves out (the read-back check leaves out `data`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "but could not be restored" not in record.getMessage()


class _QuietFailedWrites(logging.Filter):
  """A failed save (disk full) leaves one 'exception was never retrieved' traceback per array in Orbax's event
  loop; CheckpointSaveError already reports the first one, with the step and what survived."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not ("exception was never retrieved" in msg and "orbax-checkpoint-tmp" in msg)


logging.getLogger("absl").addFilter(_QuietPartialRestore())
logging.getLogger("asyncio").addFilter(_QuietFailedWrites())


class RunCheckpointer:
  """Saves/restores (TrainState, data iterator state, metadata JSON, manifest) under `directory`."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True, verify: bool = True,
               bad_dir: str | None = None, read_only: bool = False):
    """`read_only=True` opens the steps for reading only (phds_jax.checkpoint.load_params): nothing is created,
    cleaned up or saved, so a reader never touches a run that may still be writing."""
    self.directory = paths.normalize(directory)
    self.bad_dir = bad_dir or self.directory + "_bad"
    self.keep, self.verify = keep, verify
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=not read_only,
                                           cleanup_tmp_directories=not read_only,  # no max_to_keep: `_collect`
                                           read_only=read_only)  # deletes
    self.manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                         item_names=("state", "data", "meta", "manifest"))
    self._pending: tuple[int, Any, int | None] | None = None  # (step, abstract state, best step) not yet checked
    self.good: set[int] = set()  # steps restored or read back and matched this session
    self.async_save = async_save

  # ----- saving -----

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any, meta: dict, best_step: int | None = None) -> None:
    """Starts saving `step` (async by default); the previous save is finished and checked first."""
    self.finish()
    manifest = manifest_of(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                              meta=ocp.args.JsonSave(meta), manifest=ocp.args.JsonSave(manifest))
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    self._pending = (step, abstract_state(state), best_step)
    if not self.async_save:
      self.finish()

  def _save_error(self, step: int, err: Exception) -> CheckpointSaveError:
    good = sorted(self.good | (set(self.all_steps()) - {step}))
    return CheckpointSaveError(
        f"saving checkpoint step {step} in {self.directory} failed; older checkpoints are untouched (newest: "
        f"{good[-1] if good else 'none'}). Cause: {type(err).__name__}: {_short(err)}",
        fix="free disk space / fix permissions, then re-run the same command to resume")

  def finish(self) -> None:
    """Waits for the pending save, reads it back (verify=True), then deletes steps no longer kept."""
    if self._pending is None:
      return
    step, abstract, best = self._pending
    self._pending = None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if self.verify:
      try:
        self.read_verified(step, abstract, data_iter=None)
      except BadCheckpoint as e:
        logging.error("checkpoint step %d failed its read-back check (%s); keeping the older steps", step, e)
        self.quarantine(step, str(e))
        return
    self.good.add(step)
    self._collect(newest_good=step, best_step=best)

  def _collect(self, newest_good: int, best_step: int | None) -> None:
    """Deletes steps older than `newest_good` beyond the latest `keep` good ones (the best step stays)."""
    older = [s for s in self.all_steps() if s < newest_good]
    keep = set(older[-(self.keep - 1):] if self.keep > 1 else []) | {newest_good}
    if best_step is not None:
      keep.add(best_step)
    for s in older:
      if s not in keep:
        self.manager.delete(s)

  # ----- restoring -----

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def read_meta(self, step: int) -> dict | None:
    """The step's metadata JSON (config, histories), or None if unreadable; cheap (no arrays)."""
    try:
      return json.loads((self._step_dir(step) / "meta" / "metadata").read_text())
    except Exception:  # pylint: disable=broad-except
      return None

  def saved_shapes(self, step: int) -> Any:
    """The saved state's tree of shapes (from Orbax metadata; no array is read)."""
    with contextlib.closing(ocp.StandardCheckpointer()) as reader:
      meta = reader.metadata(self._step_dir(step) / "state").item_metadata
    return getattr(meta, "tree", meta)

  def read_verified(self, step: int, target: Any, data_iter: Any = None) -> tuple[Any, dict]:
    """Restores `step` into `target`, checks it against its manifest; BadCheckpoint if either fails. Public for
    readers of a chosen step (the trainer's export of the selected step), not only the resume path."""
    items = dict(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore(),
                 manifest=ocp.args.JsonRestore())
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      saved = restored["manifest"]
    except Exception as e:  # pylint: disable=broad-except
      raise BadCheckpoint(f"unreadable: {type(e).__name__}: {_short(e)}") from e
    if not saved or "arrays" not in saved:
      raise BadCheckpoint("no manifest (not written by this version, or damaged)")
    try:
      problem = compare_manifests(saved, manifest_of(restored["state"]))
    except FloatingPointError as e:
      problem = str(e)
    if problem:
      raise BadCheckpoint(f"checksum mismatch: {problem}")
    return restored["state"], restored["meta"]

  def quarantine(self, step: int, reason: str) -> str:
    """Moves a bad step out of the checkpoint folder (kept for inspection, never listed again)."""
    src = self._step_dir(step)
    dst = epath.Path(self.bad_dir) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0 and src.exists():  # one mover on shared storage; all hosts decide alike
      dst.parent.mkdir(parents=True, exist_ok=True)
      src.rename(dst)
      (dst / "WHY.txt").write_text(reason + "\n")
    self.manager.reload()
    return str(dst)

  def restore_latest_good(self, target_state: Any, data_iter: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest step that reads back and matches its manifest; None if none.

    Steps that fail are reported and moved aside. A checkpoint whose shapes differ from `target_state` is not
    damaged but incompatible: that raises ResumeError with the differences instead.
    """
    for step in reversed(self.all_steps()):
      try:
        saved = self.saved_shapes(step)
      except Exception as e:  # pylint: disable=broad-except
        self._report_bad(step, f"unreadable metadata: {type(e).__name__}: {_short(e)}")
        continue
      diff = shape_differences(saved, target_state)
      if diff:
        raise ResumeError(f"checkpoint step {step} in {self.directory} does not fit this config's model/optimizer: "
                          + "; ".join(diff),
                          fix="resume with the config the run was started with, or use a new --workdir")
      try:
        state, meta = self.read_verified(step, target_state, data_iter)
      except BadCheckpoint as e:
        self._report_bad(step, str(e))
        continue
      self.good.add(step)
      logging.info("restored checkpoint step %d from %s (manifest verified)", step, self.directory)
      return step, state, meta
    return None

  def _report_bad(self, step: int, reason: str) -> None:
    where = self.quarantine(step, reason)
    logging.error("checkpoint step %d is bad (%s); moved to %s, trying an older step", step, reason, where)

  def close(self) -> None:
    self.manager.close()


def _short(err: BaseException) -> str:
  """The error's first line without TensorStore's spec dump."""
  return _first_line(err).split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return text[0][:300] if text else ""
