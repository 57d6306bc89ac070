"""`train_and_evaluate(config, workdir)`: the PHDS fine-tuning run, usable from a notebook or `phds_jax.train`.

data -> model (static k per branch) -> loss -> one compiled step over all k levels -> verified Orbax checkpoint,
with a resume from the workdir's newest good checkpoint (config-checked, see resume.py), updates skipped when
anything is non-finite (a stop after `max_nonfinite_in_a_row` of them, keeping the last good checkpoint), and at
the end the single checkpoint exported as Orbax params and as an HF directory, plus per-k held-out losses.
The whole config is validated, and a resume checked, before the model is loaded or anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from phds_jax import checkpoint as params_ckpt
from phds_jax import data as data_lib
from phds_jax import cli, hf, models, paths, sharding
from phds_jax.models import router as router_lib
from phds_jax.training import observe, optimizer, protocol, resume, schedule, step as step_lib
from phds_jax.training.checkpointing import RunCheckpointer
from phds_jax.training.validation import TrainConfigError, validate_config


class TrainingDiverged(cli.UserError, FloatingPointError):
  """Too many non-finite steps in a row; the checkpoints hold only finite, verified states."""


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  heldout_loss_by_k: dict[int, float]
  k_histogram: dict[int, int]
  accuracy_by_k: dict[str, dict[int, float]]  # final_eval task -> k -> primary metric
  hf_dir: str | None
  orbax_dir: str | None
  selected_step: int | None = None  # the step protocol.Selector chose (exported with select.export='selected')


def load_init(config: ml_collections.ConfigDict, rng: jax.Array) -> tuple[models.ModelConfig, Any]:
  """Model config and fp32/param-dtype weights from an HF dir, an Orbax params dir, or from scratch."""
  init = config.init
  overrides = dict(config.model)
  if init.kind in ("hf", "orbax"):
    load = hf.load if init.kind == "hf" else params_ckpt.load_params
    try:
      cfg, params = load(init.path, dtype=overrides.get("param_dtype", "float32"))
    except (hf.CheckpointError, models.ConfigError):
      raise  # these already name the file
    except Exception as e:  # pylint: disable=broad-except
      raise hf.CheckpointError(f"init.path={init.path}: cannot load the {init.kind} checkpoint: "
                               f"{type(e).__name__}: {e}") from e
  else:
    cfg = models.ModelConfig(**dict(config.scratch_model))
    params = None
  cfg = cfg.replace(**overrides)
  if params is None:
    params = models.init_params(cfg, rng)
  return cfg, params


def k_schedule(config: ml_collections.ConfigDict) -> schedule.KSchedule:
  s = config.schedule
  return schedule.KSchedule(
      k_train=tuple(s.k_train), mode=s.mode, anchor=s.get("anchor") or None, switch_at=s.switch_at,
      ramp=s.ramp, probs=tuple(s.probs) if s.get("probs") else None, total_steps=config.num_steps,
      granularity=s.granularity, seed=config.seed)


def _data_config(config, host_batch: int, part: str, **overrides) -> data_lib.DataConfig:
  return data_lib.as_config(config.data, batch_size=host_batch, part=part, **overrides)


def _to_global(batch: dict[str, np.ndarray], sharding, microbatches: int) -> dict[str, jax.Array]:
  """Host batch [B_host, L] -> global arrays [M, B/M, L] sharded over the batch axis."""
  out = {}
  for key, value in batch.items():
    local = value.reshape(microbatches, value.shape[0] // microbatches, *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, local)
  return out


def heldout_losses(eval_fn, params, batches: list[dict[str, jax.Array]], ks: list[int]) -> dict[int, float]:
  """Mean token NLL on the held-out batches at each k (hard routing)."""
  out = {}
  for k in ks:
    nll = tokens = 0.0
    for b in batches:
      s, n = eval_fn(params, b, k)
      nll, tokens = nll + float(s), tokens + float(n)
    out[k] = nll / max(tokens, 1.0)
  return out


def _open_workdir(workdir: str) -> str:
  """The normalized workdir (URLs kept as URLs), created; storage errors name the path."""
  workdir = paths.normalize(workdir)
  try:
    paths.makedirs(workdir)
  except (ImportError, OSError) as e:
    raise TrainConfigError(f"workdir {workdir!r} cannot be created: {type(e).__name__}: {e}",
                           fix="check the path, its credentials, or the filesystem package its scheme needs "
                               "(gcsfs for gs://)") from e
  return workdir


def _local_inputs(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose remote inputs (gs://...) are local copies where a reader needs local files: an HF
  init checkpoint (safetensors are memory-mapped), the tokenizer, data files. Orbax init stays remote."""
  if not any(paths.is_remote(p) for p in _input_paths(config)):
    return config
  fields = config.to_dict()  # edited as a dict: a ConfigDict refuses a tuple where the config has a string
  if config.init.kind == "hf" and paths.is_remote(config.init.path):
    fields["init"]["path"] = paths.staged(config.init.path)
  if paths.is_remote(config.get("tokenizer_dir") or config.init.path):
    fields["tokenizer_dir"] = paths.staged(config.get("tokenizer_dir") or config.init.path)
  data = config.data.get("path")
  if data:
    files = [f for p in ([data] if isinstance(data, str) else list(data))
             for f in (paths.glob(p) if paths.is_remote(p) else [p])]
    fields["data"]["path"] = tuple(paths.staged(f) if paths.is_remote(f) else f for f in files)
  local = ml_collections.ConfigDict(fields)
  logging.info("remote inputs staged locally: init %s, tokenizer %s, data %s", local.init.path,
               local.get("tokenizer_dir"), local.data.get("path"))
  return local


def _input_paths(config) -> list[str]:
  data = config.data.get("path") or ()
  return [config.init.path, config.get("tokenizer_dir") or ""] + ([data] if isinstance(data, str) else list(data))


def _check_overlong(config, tokenizer) -> None:
  """With data.overlong='error', every record is tokenized once now, so an overlong one fails before training."""
  if config.data.get("overlong") != "error":
    return
  cfg = _data_config(config, 1, "train", validation_fraction=0.0, num_epochs=1, shuffle=False)
  source = data_lib.load_source(cfg)
  tokenize = data_lib.Tokenize(tokenizer, cfg.max_len, "error", data_lib.DataStats(), cfg.on_error)
  for i in range(len(source)):
    tokenize(source[i])


def _write_data_stats(workdir: str, stats: data_lib.DataStats, start_step: int, step: int) -> None:
  """data_stats.json: what the pipeline skipped, truncated or dropped, with the first reasons (since this start)."""
  info = dict(counts=stats.counts, first_reasons=stats.reasons, since_step=start_step, at_step=step,
              note="validation-scan counts cover the whole dataset; read-time counts include prefetched records")
  paths.write_text(paths.join(workdir, "data_stats.json"), json.dumps(info, indent=1) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Runs (or resumes) the configured training in `workdir`; returns the final per-k held-out losses."""
  validate_config(config)
  workdir = _open_workdir(workdir)
  is_main = jax.process_index() == 0
  ckpt = RunCheckpointer(paths.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                         async_save=config.checkpoint.async_save, verify=config.checkpoint.get("verify", True))
  try:
    return _train(config, workdir, ckpt, is_main)
  finally:
    ckpt.close()


def _resume_check(config, ckpt: RunCheckpointer) -> tuple[dict | None, dict]:
  """(newest readable checkpoint metadata, config changes), refused before anything loads (resume.py)."""
  for step in reversed(ckpt.all_steps()):
    saved = ckpt.read_meta(step)
    if saved is not None:
      return saved, resume.check(config, saved, step)
  return None, {}


def _train(config: ml_collections.ConfigDict, workdir: str, ckpt: RunCheckpointer, is_main: bool) -> RunResult:
  config, units = protocol.resolve_for_run(config)  # epochs / steps -> the step counts used below
  logging.info("schedule: %s", units)
  saved_meta, changes = _resume_check(config, ckpt)
  rng = jax.random.PRNGKey(config.seed)
  sched = k_schedule(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  microbatches = config.microbatches
  host_batch = config.batch_size // jax.process_count()
  local = _local_inputs(config)  # remote inputs staged to local disk; `config` (saved, compared) keeps the URLs
  tokenizer_dir = local.get("tokenizer_dir") or local.init.path
  tokenizer = data_lib.ChatTokenizer.from_dir(tokenizer_dir, template=config.data.get("template", "auto"))
  _check_overlong(local, tokenizer)
  stats = data_lib.DataStats()
  train_iter = data_lib.make_dataset(_data_config(local, host_batch, "train", num_epochs=None, seed=config.seed),
                                     tokenizer, stats=stats)
  heldout = []
  if config.data.get("validation_fraction", 0) > 0 and config.eval.batches > 0:
    val_iter = data_lib.make_dataset(_data_config(local, host_batch // microbatches, "validation",
                                                  num_epochs=1, shuffle=False), tokenizer, stats=stats)
    heldout = [b for _, b in zip(range(config.eval.batches), val_iter)]

  model_cfg, params = load_init(local, rng)
  schedule.validate(sched, model_cfg.k_pre)
  sharding.validate_mesh_for_model(mesh, model_cfg.num_experts)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise TrainConfigError(f"tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model only "
                           f"{model_cfg.vocab_size}", fix="set tokenizer_dir to the checkpoint's tokenizer")
  tx, lr_schedule = optimizer.make_optimizer(config, config.num_steps, params)
  with jax.set_mesh(mesh):
    state, state_shardings = step_lib.sharded_init_state(params, tx, mesh)
    del params
    batch_sharding = sharding.batch_sharding(mesh, leading_unsharded=1)
    eval_sharding = sharding.batch_sharding(mesh)
    heldout = [{k: jax.make_array_from_process_local_data(eval_sharding, v) for k, v in b.items()} for b in heldout]

    # The config travels with every checkpoint; the schedule needs no state beyond the step (k is a pure
    # function of seed and step), so step + config restore it exactly.
    selector = protocol.Selector(config, model_cfg, tokenizer_dir, sched.k_train)
    meta = {"k_histogram": {}}
    start = 0
    if ckpt.all_steps():
      found = ckpt.restore_latest_good(state, train_iter)
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
                      *changes["num_steps"], start, float(old_tx_lr(start)), float(lr_schedule(start)))
    train_step = jax.jit(
        step_lib.make_train_step(model_cfg, sched.levels, tx, mode=config.router_mode,
                                 lb_coef=config.loss.lb_coef, z_coef=config.loss.z_coef),
        in_shardings=(state_shardings, batch_sharding, None), out_shardings=(state_shardings, None),
        donate_argnums=(0,))
    eval_fn = step_lib.make_eval_fn(model_cfg)
    k_hist = {int(k): int(v) for k, v in meta.get("k_histogram", {}).items()}
    eval_ks = (list(config.eval.ks) if config.eval.get("ks")
               else sorted(set(sched.levels) | set(range(1, model_cfg.k_pre + 1))))
    slots = router_lib.num_slots(max(sched.levels), model_cfg.k_pre, config.router_mode)
    flops_tok = observe.train_flops_per_token(model_cfg, config.data.max_len, slots)
    peak = observe.peak_tflops(config.get("peak_tflops", 0.0))
    log = observe.RunLog(workdir, config.num_steps, start, enabled=is_main)
    if is_main:
      resume.append_history(workdir, config, start, changes)
      if not paths.exists(paths.join(workdir, "run_info.json")):
        _write_run_info(workdir, config, model_cfg, sched, mesh)
    last_saved, in_a_row = start, 0
    max_in_a_row = config.get("max_nonfinite_in_a_row", 1)
    try:
      for step in range(start, config.num_steps):
        batch = _to_global(next(train_iter), batch_sharding, microbatches)
        idx = schedule.level_indices(sched, step, microbatches)
        ks = [sched.levels[i] for i in idx]
        state, metrics = train_step(state, batch, jnp.asarray(idx))
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        applied = bool(metrics["applied"])
        in_a_row = 0 if applied else in_a_row + 1
        for k in ks:
          k_hist[k] = k_hist.get(k, 0) + 1
        tokens_m = np.asarray(metrics["tokens_M"])
        record = dict(step=step + 1, loss=loss, lr=float(lr_schedule(step)), grad_norm=float(metrics["grad_norm"]),
                      lb_loss=float(metrics["lb_loss"]), z_loss=float(metrics["z_loss"]), k_M=ks,
                      loss_M=[float(x) for x in np.asarray(metrics["nll_sum_M"]) / np.maximum(tokens_m, 1)])
        if not applied:
          record.update(skipped=True, skipped_total=int(state.skipped))
          logging.warning("step %d (k=%s): loss %s, grad_norm %s: non-finite, update skipped (%d in a row, "
                          "limit %d)", step + 1, ks, loss, record["grad_norm"], in_a_row, max_in_a_row)
        done = step + 1
        val = None
        if heldout and (done % config.eval.every_steps == 0 or done == config.num_steps):
          val = heldout_losses(eval_fn, state.params, heldout, eval_ks)
          record.update({f"val_loss_k{k}": v for k, v in val.items()})
          record["val_loss"] = float(np.mean(list(val.values())))
        best = False
        if selector.due(done):
          fields = selector.score(state.params, val)
          record.update(fields)
          best = selector.update(done, fields)
        log.step(record, ks, np.asarray(metrics["nll_sum_M"]), tokens_m, float(tokens_m.sum()), flops_tok, peak)
        if in_a_row >= max_in_a_row:
          ckpt.finish()
          good = ckpt.latest_step() or "none yet"
          raise TrainingDiverged(
              f"loss is {loss} (grad_norm {record['grad_norm']}) at step {done} (k={ks}): {in_a_row} non-finite "
              f"step(s) in a row, none applied; stopped without saving. The last good checkpoint is step {good} "
              f"in {ckpt.directory}.",
              fix="lower optimizer.lr or raise optimizer.clip / check the data; re-running resumes from it "
                  "(with --config.resume.allow_changes=optimizer.lr for a new lr), or raise "
                  "max_nonfinite_in_a_row to skip more such steps")
        if done % config.checkpoint.every_steps == 0 or done == config.num_steps or best:
          meta.update(selector.meta(), best_step=selector.best_step)  # the selected step is always kept
          meta["k_histogram"] = {str(k): v for k, v in k_hist.items()}
          meta["skipped_updates"] = int(state.skipped)
          ckpt.save(done, state, train_iter, dict(meta), best_step=meta.get("best_step"))
          last_saved = done
          log.flush()
          if is_main:
            _write_data_stats(workdir, stats, start, done)
      ckpt.finish()
    finally:
      log.close()

    final_step = max(int(state.step), start)
    exported_step = final_step
    if config.select.export == "selected" and selector.best_step not in (None, final_step):
      state, _ = ckpt.read_verified(selector.best_step, state)
      exported_step = selector.best_step
    final = heldout_losses(eval_fn, state.params, heldout, eval_ks) if heldout else {}
  hf_dir = orbax_dir = None
  if is_main:
    _write_data_stats(workdir, stats, start, final_step)
    selector.write(workdir, exported_step)
    params_host = jax.device_get(state.params)
    if config.export.orbax:
      orbax_dir = str(params_ckpt.save_params(paths.join(workdir, "final", "orbax"), model_cfg, params_host,
                                              overwrite=True))
    if config.export.hf:
      hf_dir = _export_hf(paths.join(workdir, "final", "hf"), model_cfg, params_host, tokenizer_dir)
    accuracy = final_evaluation(config, model_cfg, params_host, tokenizer_dir, workdir, eval_ks)
    observe.plot_run(workdir, k_hist, final)
    paths.write_text(paths.join(workdir, "heldout_by_k.json"),
                     json.dumps({str(k): v for k, v in final.items()}, indent=1))
    logging.info("finished at step %d (last checkpoint %d, %d update(s) skipped as non-finite)", final_step,
                 last_saved, int(state.skipped))
  else:
    accuracy = {}
  return RunResult(workdir, final_step, final, k_hist, accuracy, hf_dir, orbax_dir, selector.best_step)


def _export_hf(out: str, model_cfg, params_host, tokenizer_dir: str) -> str:
  """hf.save writes local files; a remote destination gets them copied through epath."""
  if not paths.is_remote(out):
    return str(hf.save(out, model_cfg, params_host, tokenizer_dir=tokenizer_dir, overwrite=True))
  with tempfile.TemporaryDirectory() as tmp:
    local = hf.save(os.path.join(tmp, "hf"), model_cfg, params_host, tokenizer_dir=tokenizer_dir, overwrite=True)
    dst = paths.as_epath(out)
    dst.mkdir(parents=True, exist_ok=True)
    for f in os.listdir(local):
      paths.as_epath(os.path.join(local, f)).copy(dst / f, overwrite=True)
  return out


def final_evaluation(config, model_cfg, params, tokenizer_dir: str, workdir: str,
                     ks: list[int]) -> dict[str, dict[int, float]]:
  """Runs `config.final_eval.tasks` (phds_jax.evaluation specs) at every k; results under workdir/eval."""
  fe = config.final_eval
  if not fe.tasks:
    return {}
  from phds_jax import evaluation  # pylint: disable=g-import-not-at-top
  results = evaluation.evaluate(model_cfg, params, hf.load_tokenizer(tokenizer_dir), list(fe.tasks),
                                ks=sorted(set(ks) | set(range(1, model_cfg.k_pre + 1))),
                                limit=fe.limit or None, batch_size=fe.batch_size,
                                out_dir=os.path.join(workdir, "eval"), progress=True)
  return {task: {int(k): v[entry["primary"]] for k, v in entry["by_k"].items()}
          for task, entry in results.summary["tasks"].items()}


def _write_run_info(workdir, config, model_cfg, sched, mesh) -> None:
  info = dict(config=config.to_dict(), model=dataclasses.asdict(model_cfg), schedule=dataclasses.asdict(sched),
              mesh=dict(mesh.shape), devices=jax.device_count(), backend=jax.default_backend(),
              started=time.strftime("%Y-%m-%d %H:%M:%S"),
              note=f"the first start's settings; every start (and allowed change) is in {resume.HISTORY}")
  paths.write_text(paths.join(workdir, "run_info.json"), json.dumps(info, indent=1, default=str))
