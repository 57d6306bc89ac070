"""`train_and_evaluate(config, workdir)`: the PHDS fine-tuning run, usable from a notebook or `phds_jax.train`.

data -> model (static k per branch) -> loss -> one compiled step over all k levels -> Orbax checkpoint,
with a resume from the workdir's latest complete checkpoint, a stop on NaN that keeps the last good one, and at
the end the single checkpoint exported as Orbax params and as an HF directory, plus per-k held-out losses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from phds_jax import checkpoint as params_ckpt
from phds_jax import data as data_lib
from phds_jax import hf, models, parallel, schedule
from phds_jax.models import router as router_lib
from phds_jax.training import observe, optimizer, step as step_lib
from phds_jax.training.checkpointing import RunCheckpointer
from phds_jax.training.validation import validate_config


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  heldout_loss_by_k: dict[int, float]
  k_histogram: dict[int, int]
  accuracy_by_k: dict[str, dict[int, float]]  # final_eval task -> k -> primary metric
  hf_dir: str | None
  orbax_dir: str | None


def load_init(config: ml_collections.ConfigDict, rng: jax.Array) -> tuple[models.ModelConfig, Any]:
  """Model config and fp32/param-dtype weights from an HF dir, an Orbax params dir, or from scratch."""
  init = config.init
  overrides = dict(config.model)
  if init.kind == "hf":
    cfg, params = hf.load(init.path, dtype=overrides.get("param_dtype", "float32"))
  elif init.kind == "orbax":
    cfg, params = params_ckpt.load_params(init.path, dtype=overrides.get("param_dtype", "float32"))
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Runs (or resumes) the configured training in `workdir`; returns the final per-k held-out losses."""
  validate_config(config)
  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  rng = jax.random.PRNGKey(config.seed)
  model_cfg, params = load_init(config, rng)
  sched = k_schedule(config)
  schedule.validate(sched, model_cfg.k_pre)
  mesh = parallel.make_mesh(dict(config.mesh))
  parallel.validate_mesh_for_model(mesh, model_cfg.num_experts)
  microbatches = config.microbatches
  if config.batch_size % (parallel.batch_shards(mesh) * microbatches):
    raise ValueError(f"batch_size={config.batch_size} must be divisible by mesh batch shards "
                     f"({parallel.batch_shards(mesh)}) x microbatches ({microbatches})")
  host_batch = config.batch_size // jax.process_count()
  tokenizer_dir = config.get("tokenizer_dir") or config.init.path
  tokenizer = data_lib.ChatTokenizer.from_dir(tokenizer_dir, template=config.data.get("template", "auto"))
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model_cfg.vocab_size}")

  train_iter = data_lib.make_dataset(_data_config(config, host_batch, "train", num_epochs=None, seed=config.seed),
                                     tokenizer)
  heldout = []
  if config.data.get("validation_fraction", 0) > 0 and config.eval.batches > 0:
    val_iter = data_lib.make_dataset(_data_config(config, host_batch // microbatches, "validation",
                                                  num_epochs=1, shuffle=False), tokenizer)
    heldout = [b for _, b in zip(range(config.eval.batches), val_iter)]

  tx, lr_schedule = optimizer.make_optimizer(config, config.num_steps, params)
  with jax.set_mesh(mesh):
    state, state_shardings = step_lib.sharded_init_state(params, tx, mesh)
    del params
    batch_sharding = parallel.batch_sharding(mesh, leading_unsharded=1)
    eval_sharding = parallel.batch_sharding(mesh)
    heldout = [{k: jax.make_array_from_process_local_data(eval_sharding, v) for k, v in b.items()} for b in heldout]
    train_step = jax.jit(
        step_lib.make_train_step(model_cfg, sched.levels, tx, mode=config.router_mode,
                                 lb_coef=config.loss.lb_coef, z_coef=config.loss.z_coef),
        in_shardings=(state_shardings, batch_sharding, None), out_shardings=(state_shardings, None),
        donate_argnums=(0,))
    eval_fn = step_lib.make_eval_fn(model_cfg)

    ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                           best_metric="val_loss" if heldout else None,
                           async_save=config.checkpoint.async_save)
    start = ckpt.latest_step() or 0
    # The config travels with every checkpoint; the schedule needs no state beyond the step (k is a pure
    # function of seed and step), so step + config restore it exactly.
    meta = {"k_histogram": {}, "best_val_loss": None,
            "config": json.loads(json.dumps(config.to_dict(), default=str))}
    if start:
      state, meta = ckpt.restore(start, state, train_iter)
    k_hist = {int(k): int(v) for k, v in meta.get("k_histogram", {}).items()}
    eval_ks = (list(config.eval.ks) if config.eval.get("ks")
               else sorted(set(sched.levels) | set(range(1, model_cfg.k_pre + 1))))
    slots = router_lib.num_slots(max(sched.levels), model_cfg.k_pre, config.router_mode)
    flops_tok = observe.train_flops_per_token(model_cfg, config.data.max_len, slots)
    peak = observe.peak_tflops(config.get("peak_tflops", 0.0))
    log = observe.RunLog(workdir, config.num_steps, start, enabled=is_main)
    if is_main:
      _write_run_info(workdir, config, model_cfg, sched, mesh)
    last_saved = start
    try:
      for step in range(start, config.num_steps):
        batch = _to_global(next(train_iter), batch_sharding, microbatches)
        idx = schedule.level_indices(sched, step, microbatches)
        ks = [sched.levels[i] for i in idx]
        state, metrics = train_step(state, batch, jnp.asarray(idx))
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
          ckpt.wait()
          raise FloatingPointError(
              f"loss is {loss} at step {step + 1} (k={ks}); stopped without saving. The last good checkpoint "
              f"is step {ckpt.latest_step()} in {os.path.join(workdir, 'checkpoints')}.")
        for k in ks:
          k_hist[k] = k_hist.get(k, 0) + 1
        tokens_m = np.asarray(metrics["tokens_M"])
        record = dict(step=step + 1, loss=loss, lr=float(lr_schedule(step)), grad_norm=float(metrics["grad_norm"]),
                      lb_loss=float(metrics["lb_loss"]), z_loss=float(metrics["z_loss"]), k_M=ks,
                      loss_M=[float(x) for x in np.asarray(metrics["nll_sum_M"]) / np.maximum(tokens_m, 1)])
        done = step + 1
        val = None
        if heldout and (done % config.eval.every_steps == 0 or done == config.num_steps):
          val = heldout_losses(eval_fn, state.params, heldout, eval_ks)
          record.update({f"val_loss_k{k}": v for k, v in val.items()})
          record["val_loss"] = float(np.mean(list(val.values())))
        log.step(record, ks, np.asarray(metrics["nll_sum_M"]), tokens_m, float(tokens_m.sum()), flops_tok, peak)
        if done % config.checkpoint.every_steps == 0 or done == config.num_steps:
          if val is not None and (meta.get("best_val_loss") is None or record["val_loss"] < meta["best_val_loss"]):
            meta["best_val_loss"], meta["best_step"] = record["val_loss"], done
          meta["k_histogram"] = {str(k): v for k, v in k_hist.items()}
          ckpt.save(done, state, train_iter, dict(meta), metrics={"val_loss": record["val_loss"]} if val else None)
          last_saved = done
      ckpt.wait()
    finally:
      log.close()
      ckpt.close()

    final = heldout_losses(eval_fn, state.params, heldout, eval_ks) if heldout else {}
  hf_dir = orbax_dir = None
  if is_main:
    params_host = jax.device_get(state.params)
    if config.export.orbax:
      orbax_dir = str(params_ckpt.save_params(os.path.join(workdir, "final", "orbax"), model_cfg, params_host,
                                              overwrite=True))
    if config.export.hf:
      hf_dir = str(hf.save(os.path.join(workdir, "final", "hf"), model_cfg, params_host,
                           tokenizer_dir=tokenizer_dir, overwrite=True))
    accuracy = final_evaluation(config, model_cfg, params_host, tokenizer_dir, workdir, eval_ks)
    observe.plot_run(workdir, k_hist, final)
    with open(os.path.join(workdir, "heldout_by_k.json"), "w") as f:
      json.dump({str(k): v for k, v in final.items()}, f, indent=1)
    logging.info("finished at step %d (last checkpoint %d)", config.num_steps, last_saved)
  else:
    accuracy = {}
  return RunResult(workdir, int(state.step), final, k_hist, accuracy, hf_dir, orbax_dir)


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
              started=time.strftime("%Y-%m-%d %H:%M:%S"))
  with open(os.path.join(workdir, "run_info.json"), "w") as f:
    json.dump(info, f, indent=1, default=str)
