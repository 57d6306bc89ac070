"""Checks a training config before anything is loaded or compiled, with messages that name the field.

Every check here is cheap (small JSON headers, globs, a task registry): a typo, an out-of-range value or an
unknown field fails in a second with one line that names the field and the fix, not after the model loads or
at the first eval. `TrainConfigError` is an `errors.UserError`: the CLI prints it without a traceback (exit 2).
`validate_config` returns the run's k plan (phds_jax/kplan.py), checked here against the init checkpoint's k_pre.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors import safe_open

from configs.base import base_config
from phds_jax import errors, kplan, paths, sharding
from phds_jax.data.errors import ON_ERROR
from phds_jax.data.formats import FORMATS
from phds_jax.data.pipeline import PACKINGS, DataConfig
from phds_jax.data.tokenize import OVERLONG
from phds_jax.evaluation import tasks as tasks_lib
from phds_jax.hf.config import k_pre_of
from phds_jax.models.config import GMM_IMPLS, ROUTING_IMPLS, ModelConfig
from phds_jax.models.router import ROUTER_MODES
from phds_jax.training import schedule

INIT_KINDS = ("hf", "orbax", "scratch")
SIGNALS = ("loss", "mc")  # select.*: training/protocol.py
RULES = ("best_at_kpre", "mean_over_k")
EXPORTS = ("final", "selected")
LR_DECAYS = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
# data.* fields the trainer sets itself (per host, per part); a config may not set them.
_DATA_RUNTIME = ("batch_size", "part", "seed", "shuffle", "num_epochs", "shard_index", "shard_count")


class TrainConfigError(errors.UserError, ValueError):
  """A training configuration that cannot run."""


def _need(cond: bool, msg: str, fix: str | None = None) -> None:
  if not cond:
    raise TrainConfigError(msg, fix)


def _choice(config: Any, field: str, choices: tuple[str, ...], default: str | None = None) -> None:
  value = _get(config, field)
  near = difflib.get_close_matches(str(value), choices, n=1)
  _need(value in choices, f"{field}={value!r} is not one of {choices}",
        f"--config.{field}={(near or [default or choices[0]])[0]}")


def _get(config: Any, field: str) -> Any:
  for part in field.split("."):
    config = config[part]
  return config


def known_fields() -> set[str]:
  """Every dotted field a training config may hold: base_config's, plus ModelConfig/DataConfig fields."""
  names = set(errors.config_field_names(base_config()))
  model_fields = [f.name for f in dataclasses.fields(ModelConfig)]
  names |= {f"model.{f}" for f in model_fields} | {f"scratch_model.{f}" for f in model_fields}
  names |= {f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.name not in _DATA_RUNTIME}
  return names


def check_known_fields(config: ml_collections.ConfigDict) -> None:
  """Unknown fields (typos such as `optimizer.decya`) fail with the closest known names."""
  known = known_fields()
  for name in errors.config_field_names(config):
    if name not in known:
      raise TrainConfigError(f"unknown config field {name!r}{errors.close_matches(name, known)}",
                             fix="rename or remove it (configs/base.py lists every field)")


def _probe(fn, path: str, field: str) -> Any:
  """fn(path), with storage errors (no gcsfs for gs://, no credentials, no network) naming the field."""
  try:
    return fn(path)
  except (ImportError, OSError) as e:
    raise TrainConfigError(f"{field}={path!r} cannot be read: {type(e).__name__}: {e}",
                           fix="check the path, its credentials, or the filesystem package its scheme needs "
                               "(gcsfs for gs://)") from None


def _model_json(init) -> dict:
  """The init checkpoint's config.json (hf) / model_config.json (orbax), errors naming the file."""
  name = "config.json" if init.kind == "hf" else "model_config.json"
  path = paths.join(init.path, name)
  _need(paths.exists(path), f"init.path={init.path!r} has no {name}: not an {init.kind} checkpoint directory",
        "point init.path at the checkpoint directory, or set init.kind")
  try:
    return json.loads(paths.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TrainConfigError(f"{path}: malformed JSON ({e})", "re-download or re-export the checkpoint") from None


def init_header(config: ml_collections.ConfigDict) -> tuple[str | None, int]:
  """(model_type, k_pre) of the init checkpoint (or scratch_model), from its small config file (a `config.model`
  override of k_pre is applied by `validate_config`, as loading applies it)."""
  init = config.init
  if init.kind == "scratch":
    _need(bool(config.get("scratch_model")), "init.kind='scratch' needs config.scratch_model (ModelConfig fields)")
    return config.scratch_model.get("model_type"), int(config.scratch_model.k_pre)
  _need(bool(init.path) and _probe(paths.isdir, init.path, "init.path"), f"init.path={init.path!r} does not exist",
        "--config.init.path=<a checkpoint directory>")
  raw = _model_json(init)
  if init.kind == "hf" and not paths.is_remote(init.path):
    _check_safetensors_headers(init.path)
  k_pre = k_pre_of(raw)
  _need(isinstance(k_pre, int) and k_pre >= 1,
        f"{paths.join(init.path, 'config.json' if init.kind == 'hf' else 'model_config.json')}: "
        f"no valid num_experts_per_tok (got {k_pre!r}); not an MoE checkpoint?")
  return raw.get("model_type"), int(k_pre)


def _check_safetensors_headers(directory: str) -> None:
  """Opens every *.safetensors header (no tensor is read): a truncated or foreign file is named now."""
  for path in sorted(paths.glob(os.path.join(directory, "*.safetensors"))):
    try:
      with safe_open(path, framework="numpy") as f:
        f.keys()
    except Exception as e:  # pylint: disable=broad-except
      raise TrainConfigError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})",
                             fix="re-download or re-convert the checkpoint") from None


def _check_optimizer(o) -> None:
  _need(o.lr > 0 and np.isfinite(o.lr), f"optimizer.lr={o.lr} must be a finite number > 0", "--config.optimizer.lr=2e-5")
  _need(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0")
  _need(0.0 <= o.get("final_lr_fraction", 0.0) <= 1.0,
        f"optimizer.final_lr_fraction={o.final_lr_fraction} must be in [0, 1]")
  _need(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, f"optimizer.b1={o.b1}, b2={o.b2} must be in [0, 1)")
  _need(o.eps > 0, f"optimizer.eps={o.eps} must be > 0")
  _need(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
  _need(o.clip >= 0, f"optimizer.clip={o.clip} must be >= 0 (0 = no clipping)")


def _check_data(config) -> None:
  for field, choices in (("data.on_error", ON_ERROR), ("data.overlong", OVERLONG), ("data.format", FORMATS),
                         ("data.packing", PACKINGS)):
    if field.split(".")[1] in config.data:
      _choice(config, field, choices)
  _need(config.data.max_len >= 2, f"data.max_len={config.data.max_len} must be >= 2")
  data_paths = config.data.get("path")
  _need(bool(data_paths) or bool(config.data.get("tfds_name")), "data.path is empty (and no data.tfds_name)",
        "--config.data.path=/path/to/train.jsonl")
  if data_paths and not config.data.get("tfds_name"):
    for p in [data_paths] if isinstance(data_paths, str) else list(data_paths):
      _need(bool(_probe(paths.glob, p, "data.path")), f"data.path {p!r} matches no file")
  frac = config.data.get("validation_fraction", 0.0)
  _need(0.0 <= frac < 1.0, f"data.validation_fraction={frac} must be in [0, 1)")


def _check_eval(config) -> None:
  _need(config.eval.every_steps >= 1, "eval.every_steps must be >= 1")
  _need(config.eval.batches >= 0, f"eval.batches={config.eval.batches} must be >= 0")
  fe = config.final_eval
  _need(fe.limit >= 0 and fe.batch_size >= 1, f"final_eval.limit={fe.limit} must be >= 0, batch_size >= 1")
  if fe.tasks:
    try:
      found = tasks_lib.get_tasks(list(fe.tasks))
    except ValueError as e:
      raise TrainConfigError(f"final_eval.tasks={tuple(fe.tasks)}: {e}") from None
    for t in found:
      path = getattr(t, "path", None)
      _need(not path or path.startswith("tfds:") or paths.exists(path),
            f"final_eval.tasks: {t.name}: file {path!r} does not exist")


def batch_error(batch_size: int, microbatches: int, num_devices: int) -> str | None:
  """Why the global batch cannot be split into microbatches of whole rows on every device (None if it can):
  the trainer refuses such a config, the dry run warns about it."""
  if batch_size % (num_devices * microbatches):
    return (f"batch_size={batch_size} must be divisible by data-parallel size ({num_devices}) x microbatches "
            f"({microbatches})")
  return None


def host_batch(batch_size: int) -> int:
  """Rows of each global batch this process reads (whole rows per device: `batch_error` is None)."""
  return batch_size // jax.process_count()


def validate_select(config: ml_collections.ConfigDict) -> None:
  """select.*: the checkpoint-selection protocol (training/protocol.py runs it)."""
  sel = config.select
  _need(sel.signal in SIGNALS, f"select.signal={sel.signal!r} is not one of {SIGNALS}")
  _need(sel.rule in RULES, f"select.rule={sel.rule!r} is not one of {RULES}")
  _need(sel.export in EXPORTS, f"select.export={sel.export!r} is not one of {EXPORTS}")
  _need(int(sel.burn_in_steps) >= 0, f"select.burn_in_steps={sel.burn_in_steps} must be >= 0")
  _need(sel.signal != "mc" or bool(sel.task),
        "select.signal='mc' needs select.task, a validation multiple-choice task (e.g. jsonl:PATH)",
        "--config.select.task=jsonl:/data/valid_mc.jsonl, or --config.select.signal=loss")
  if sel.signal == "mc":
    try:
      task = tasks_lib.get_task(sel.task)
    except ValueError as e:
      raise TrainConfigError(f"select.task: {e}") from e
    _need(task.kind == tasks_lib.MC,
          f"select.task={sel.task!r} is a {task.kind} task; selection needs multiple choice")


def validate_config(config: ml_collections.ConfigDict) -> kplan.KPlan:
  """The run's k plan; raises TrainConfigError for the first problem found. Cheap (reads only small JSON
  headers): the trainer and the dry run call it before anything loads."""
  check_known_fields(config)
  for field in ("num_steps", "microbatches", "batch_size"):
    _need(config[field] >= 1, f"{field}={config[field]} must be >= 1")
  _need(config.get("max_nonfinite_in_a_row", 1) >= 1,
        f"max_nonfinite_in_a_row={config.get('max_nonfinite_in_a_row')} must be >= 1")
  _choice(config, "router_mode", ROUTER_MODES, default="soft")
  _choice(config, "init.kind", INIT_KINDS)
  _choice(config, "optimizer.decay", LR_DECAYS)
  for field, choices in (("model.dtype", DTYPES), ("model.param_dtype", DTYPES), ("model.gmm_impl", GMM_IMPLS),
                         ("model.routing_impl", ROUTING_IMPLS)):
    if field.split(".")[1] in config.model:
      _choice(config, field, choices)
  _check_optimizer(config.optimizer)
  model_type, k_pre = init_header(config)
  k_pre = int(config.model.get("k_pre", k_pre))  # loading applies config.model on top of the checkpoint
  expected = config.get("model_type") or None
  _need(expected is None or expected == model_type,
        f"init checkpoint is {model_type!r} but the config is for {expected!r}")
  # switch_at / ramp in 'steps' or 'epochs' are checked when training/protocol.py resolves them from the data.
  sched = schedule.from_config(config)
  try:
    schedule.validate(sched, k_pre)
  except (schedule.ScheduleError, ValueError) as e:
    raise TrainConfigError(f"schedule: {e}") from None
  n = jax.device_count()
  try:
    sharding.mesh_sizes(dict(config.mesh), n)
  except sharding.MeshError as e:
    raise TrainConfigError(f"mesh: {e}", fix="--config.mesh.data=-1 takes every device") from None
  batch_problem = batch_error(config.batch_size, config.microbatches, n)
  _need(batch_problem is None, batch_problem)
  _check_data(config)
  _need(config.checkpoint.every_steps >= 1 and config.checkpoint.keep >= 1,
        "checkpoint.every_steps and checkpoint.keep must be >= 1")
  requested = tuple(config.eval.get("ks") or ())
  try:
    plan = kplan.KPlan.for_training(k_pre, sched.levels, config.router_mode, requested)
  except ValueError as e:
    raise TrainConfigError(str(e), fix=f"--config.eval.ks=\"(1,{k_pre})\" or () for all") from None
  _check_eval(config)
  if "select" in config:
    validate_select(config)
  _check_allow_changes(config)
  return plan


def _check_allow_changes(config) -> None:
  """resume.allow_changes names fields or sections (`optimizer.lr`, `data`); a typo would allow nothing."""
  raw = config.get("resume", {}).get("allow_changes", ())
  _need(isinstance(raw, (tuple, list, str)), f"resume.allow_changes={raw!r} must be field names",
        "--config.resume.allow_changes=optimizer.lr,seed")
  names = [n.strip() for n in (raw.split(",") if isinstance(raw, str) else raw) if n and n.strip()]
  known = known_fields()
  for n in names:
    _need(n in known, f"resume.allow_changes: unknown field {n!r}{errors.close_matches(n, known)}")
