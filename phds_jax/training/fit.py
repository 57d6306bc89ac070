"""Fitting: the optimizer steps of a set-up `Run`, from its first (or resumed) step to `num_steps`.

One compiled step holds a branch per k level of the plan (training/step.py); each step's k comes from the
schedule, held-out losses are measured every `eval.every_steps` at the plan's held-out ks, the selector scores
the model after its burn-in, and a verified checkpoint is written every `checkpoint.every_steps` (and at the
best step). A non-finite update is skipped inside the compiled step; `max_nonfinite_in_a_row` of them stop the
run naming the step and k, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax import errors, paths, sharding
from phds_jax import data as data_lib
from phds_jax.training import observe, optimizer, protocol, resume, schedule
from phds_jax.training import step as step_lib
from phds_jax.training.run import Run


class TrainingDiverged(errors.UserError, FloatingPointError):
  """Too many non-finite steps in a row; the checkpoints hold only finite, verified states."""


@dataclasses.dataclass
class Fitted:
  """What the steps left: the last state and what the export and the evaluation need from the fit."""

  state: step_lib.TrainState
  start: int  # the step this start resumed from (0: a fresh run)
  final_step: int
  last_saved: int
  k_histogram: dict[int, int]
  selector: protocol.Selector
  eval_fn: Any  # eval(params, batch, k) -> (nll_sum, tokens)
  heldout: list[dict[str, jax.Array]]  # the held-out batches on the mesh


def to_global(batch: dict[str, np.ndarray], batch_sharding, microbatches: int) -> dict[str, jax.Array]:
  """Host batch [B_host, L] -> global arrays [M, B/M, L] sharded over the batch axis."""
  out = {}
  for key, value in batch.items():
    local = value.reshape(microbatches, value.shape[0] // microbatches, *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(batch_sharding, local)
  return out


def heldout_losses(eval_fn, params, batches: list[dict[str, jax.Array]], ks) -> dict[int, float]:
  """Mean token NLL on the held-out batches at each k (hard routing)."""
  out = {}
  for k in ks:
    nll = tokens = 0.0
    for b in batches:
      s, n = eval_fn(params, b, k)
      nll, tokens = nll + float(s), tokens + float(n)
    out[k] = nll / max(tokens, 1.0)
  return out


def write_data_stats(workdir: str, stats: data_lib.DataStats, start_step: int, step: int) -> None:
  """data_stats.json: what the pipeline skipped, truncated or dropped, with the first reasons (since this start)."""
  info = dict(counts=stats.counts, first_reasons=stats.reasons, since_step=start_step, at_step=step,
              note="validation-scan counts cover the whole dataset; read-time counts include prefetched records")
  paths.write_text(paths.join(workdir, "data_stats.json"), json.dumps(info, indent=1) + "\n")


@dataclasses.dataclass
class _Start:
  """Where this start begins: the (restored) state and its shardings, the step, the checkpoint metadata."""

  state: step_lib.TrainState
  shardings: Any
  step: int
  meta: dict[str, Any]
  changes: dict[str, tuple[Any, Any]]  # config changes accepted for this resume ({} for a fresh start)


def _start(run: Run, selector: protocol.Selector) -> _Start:
  """The initial state on the mesh, replaced by the newest good checkpoint when the workdir has one.

  The config travels with every checkpoint; the schedule needs no state beyond the step (k is a pure function
  of seed and step), so step + config restore it exactly."""
  config, ckpt = run.config, run.checkpointer
  state, shardings = step_lib.sharded_init_state(run.init_params, run.tx, run.mesh)
  run.init_params = None  # the state holds the weights now
  meta = {"k_histogram": {}}
  start, saved_meta, changes = 0, run.saved_meta, run.changes
  if ckpt.all_steps():
    found = ckpt.restore_latest_good(state, run.train_iter)
    if found is None:
      logging.error("no usable checkpoint left in %s: starting from step 0", ckpt.directory)
      saved_meta, changes = None, {}
    else:
      start, state, meta = found
      selector.restore(meta)
  meta["config"] = resume.plain(config)
  if saved_meta and "num_steps" in changes:
    old_tx_lr = optimizer.learning_rate_schedule(
        config.optimizer.lr, changes["num_steps"][0], config.optimizer.warmup_steps, config.optimizer.decay,
        config.optimizer.get("final_lr_fraction", 0.0))
    logging.warning("num_steps %s -> %s: the lr at step %d goes from %.3g to %.3g (schedule of the new length)",
                    *changes["num_steps"], start, float(old_tx_lr(start)), float(run.lr_schedule(start)))
  return _Start(state, shardings, start, meta, changes)


def _compiled_step(run: Run, state_shardings: Any, batch_sharding: Any):
  """The train step with a branch per level of the plan, jitted with the state donated."""
  return jax.jit(
      step_lib.make_train_step(run.model_cfg, run.plan.levels, run.tx, mode=run.plan.router_mode,
                               lb_coef=run.config.loss.lb_coef, z_coef=run.config.loss.z_coef),
      in_shardings=(state_shardings, batch_sharding, None), out_shardings=(state_shardings, None),
      donate_argnums=(0,))


def _step_record(step: int, metrics: dict[str, Any], ks: list[int], lr: float) -> dict[str, Any]:
  """The metrics.jsonl record of one step (before held-out and selection fields)."""
  tokens_m = np.asarray(metrics["tokens_M"])
  return dict(step=step + 1, loss=float(metrics["loss"]), lr=lr, grad_norm=float(metrics["grad_norm"]),
              lb_loss=float(metrics["lb_loss"]), z_loss=float(metrics["z_loss"]), k_M=ks,
              loss_M=[float(x) for x in np.asarray(metrics["nll_sum_M"]) / np.maximum(tokens_m, 1)])


def _diverged(record: dict[str, Any], ks: list[int], in_a_row: int, ckpt) -> TrainingDiverged:
  good = ckpt.latest_step() or "none yet"
  return TrainingDiverged(
      f"loss is {record['loss']} (grad_norm {record['grad_norm']}) at step {record['step']} (k={ks}): {in_a_row} "
      f"non-finite step(s) in a row, none applied; stopped without saving. The last good checkpoint is step "
      f"{good} in {ckpt.directory}.",
      fix="lower optimizer.lr or raise optimizer.clip / check the data; re-running resumes from it "
          "(with --config.resume.allow_changes=optimizer.lr for a new lr), or raise "
          "max_nonfinite_in_a_row to skip more such steps")


def fit(run: Run) -> Fitted:
  """Runs the steps of `run` (under its mesh: call inside `jax.set_mesh(run.mesh)`)."""
  config, ckpt, plan, sched = run.config, run.checkpointer, run.plan, run.schedule
  microbatches = config.microbatches
  selector = protocol.Selector(config, run.model_cfg, run.tokenizer.tokenizer, sched.k_train)
  begin = _start(run, selector)
  state, meta, start = begin.state, begin.meta, begin.step
  batch_sharding = sharding.batch_sharding(run.mesh, leading_unsharded=1)
  eval_sharding = sharding.batch_sharding(run.mesh)
  heldout = [{k: jax.make_array_from_process_local_data(eval_sharding, v) for k, v in b.items()}
             for b in run.heldout]
  train_step = _compiled_step(run, begin.shardings, batch_sharding)
  eval_fn = step_lib.make_eval_fn(run.model_cfg)
  k_hist = {int(k): int(v) for k, v in meta.get("k_histogram", {}).items()}
  flops_tok = observe.train_flops_per_token(run.model_cfg, config.data.max_len, plan.max_slots)
  peak = observe.peak_tflops(config.get("peak_tflops", 0.0))
  log = observe.RunLog(run.workdir, config.num_steps, start, enabled=run.is_main)
  if run.is_main:
    resume.append_history(run.workdir, config, start, begin.changes)
    if not paths.exists(paths.join(run.workdir, "run_info.json")):
      _write_run_info(run)
  last_saved, in_a_row = start, 0
  max_in_a_row = config.get("max_nonfinite_in_a_row", 1)
  try:
    for step in range(start, config.num_steps):
      batch = to_global(next(run.train_iter), batch_sharding, microbatches)
      idx = schedule.level_indices(sched, step, microbatches)
      ks = [sched.levels[i] for i in idx]
      state, metrics = train_step(state, batch, jnp.asarray(idx))
      metrics = jax.device_get(metrics)
      applied = bool(metrics["applied"])
      in_a_row = 0 if applied else in_a_row + 1
      for k in ks:
        k_hist[k] = k_hist.get(k, 0) + 1
      record = _step_record(step, metrics, ks, float(run.lr_schedule(step)))
      if not applied:
        record.update(skipped=True, skipped_total=int(state.skipped))
        logging.warning("step %d (k=%s): loss %s, grad_norm %s: non-finite, update skipped (%d in a row, "
                        "limit %d)", step + 1, ks, record["loss"], record["grad_norm"], in_a_row, max_in_a_row)
      done = step + 1
      val = None
      if heldout and (done % config.eval.every_steps == 0 or done == config.num_steps):
        val = heldout_losses(eval_fn, state.params, heldout, plan.heldout_ks)
        record.update({f"val_loss_k{k}": v for k, v in val.items()})
        record["val_loss"] = float(np.mean(list(val.values())))
      best = False
      if selector.due(done):
        fields = selector.score(state.params, val)
        record.update(fields)
        best = selector.update(done, fields)
      tokens_m = np.asarray(metrics["tokens_M"])
      log.step(record, ks, np.asarray(metrics["nll_sum_M"]), tokens_m, float(tokens_m.sum()), flops_tok, peak)
      if in_a_row >= max_in_a_row:
        ckpt.finish()
        raise _diverged(record, ks, in_a_row, ckpt)
      if done % config.checkpoint.every_steps == 0 or done == config.num_steps or best:
        meta.update(selector.meta(), best_step=selector.best_step)  # the selected step is always kept
        meta["k_histogram"] = {str(k): v for k, v in k_hist.items()}
        meta["skipped_updates"] = int(state.skipped)
        ckpt.save(done, state, run.train_iter, dict(meta), best_step=meta.get("best_step"))
        last_saved = done
        log.flush()
        if run.is_main:
          write_data_stats(run.workdir, run.stats, start, done)
    ckpt.finish()
  finally:
    log.close()
  return Fitted(state=state, start=start, final_step=max(int(state.step), start), last_saved=last_saved,
                k_histogram=k_hist, selector=selector, eval_fn=eval_fn, heldout=heldout)


def _write_run_info(run: Run) -> None:
  info = dict(config=run.config.to_dict(), model=dataclasses.asdict(run.model_cfg),
              schedule=dataclasses.asdict(run.schedule), mesh=dict(run.mesh.shape), devices=jax.device_count(),
              backend=jax.default_backend(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
              note=f"the first start's settings; every start (and allowed change) is in {resume.HISTORY}")
  paths.write_text(paths.join(run.workdir, "run_info.json"), json.dumps(info, indent=1, default=str))
