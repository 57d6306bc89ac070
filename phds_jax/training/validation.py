"""Checks a training config before anything is loaded or compiled, with messages that name the field."""

from __future__ import annotations

import glob
import json
import os

import jax
import ml_collections
import numpy as np

from phds_jax import parallel, schedule

INIT_KINDS = ("hf", "orbax", "scratch")
ROUTER_MODES = ("soft", "hard")


class TrainConfigError(ValueError):
  """A training configuration that cannot run."""


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise TrainConfigError(msg)


def _model_type_of(init) -> str | None:
  """The architecture an init checkpoint holds (None if it cannot be read)."""
  name = "config.json" if init.kind == "hf" else "model_config.json"
  path = os.path.join(init.path, name)
  _need(os.path.exists(path), f"init.path={init.path!r} has no {name}: not an {init.kind} checkpoint directory")
  with open(path) as f:
    return json.load(f).get("model_type")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises TrainConfigError for the first problem found; cheap (reads only small JSON headers)."""
  _need(config.num_steps >= 1, f"num_steps={config.num_steps} must be >= 1")
  _need(config.microbatches >= 1, f"microbatches={config.microbatches} must be >= 1")
  _need(config.batch_size >= 1, f"batch_size={config.batch_size} must be >= 1")
  _need(config.router_mode in ROUTER_MODES, f"router_mode={config.router_mode!r} is not one of {ROUTER_MODES}")
  init = config.init
  _need(init.kind in INIT_KINDS, f"init.kind={init.kind!r} is not one of {INIT_KINDS}")
  if init.kind == "scratch":
    _need(bool(config.get("scratch_model")), "init.kind='scratch' needs config.scratch_model (ModelConfig fields)")
    k_pre = config.scratch_model.k_pre
    model_type = config.scratch_model.model_type
  else:
    _need(bool(init.path) and os.path.isdir(init.path), f"init.path={init.path!r} does not exist")
    model_type = _model_type_of(init)
    with open(os.path.join(init.path, "config.json" if init.kind == "hf" else "model_config.json")) as f:
      raw = json.load(f)
    k_pre = raw.get("num_experts_per_tok", raw.get("k_pre"))
  expected = config.get("model_type") or None
  _need(expected is None or expected == model_type,
        f"init checkpoint is {model_type!r} but the config is for {expected!r}")
  s = config.schedule
  sched = schedule.KSchedule(
      k_train=tuple(s.k_train), mode=s.mode, anchor=s.get("anchor") or None, switch_at=s.switch_at, ramp=s.ramp,
      probs=tuple(s.probs) if s.get("probs") else None, total_steps=config.num_steps, granularity=s.granularity)
  try:
    schedule.validate(sched, int(k_pre))
  except schedule.ScheduleError as e:
    raise TrainConfigError(f"schedule: {e}") from None
  mesh = dict(config.mesh)
  sizes = [int(mesh.get(a, 1)) for a in parallel.MESH_AXES]
  known = int(np.prod([x for x in sizes if x != -1]))
  n = jax.device_count()
  _need(set(mesh) <= set(parallel.MESH_AXES), f"mesh axes {sorted(mesh)} must be among {parallel.MESH_AXES}")
  _need(sizes.count(-1) <= 1 and (n % known == 0 if -1 in sizes else known == n),
        f"mesh {mesh} does not match the {n} available devices")
  shards = n
  _need(config.batch_size % (shards * config.microbatches) == 0,
        f"batch_size={config.batch_size} must be divisible by data-parallel size ({shards}) x microbatches "
        f"({config.microbatches})")
  paths = config.data.get("path")
  if paths and not config.data.get("tfds_name"):
    for p in [paths] if isinstance(paths, str) else list(paths):
      _need(bool(glob.glob(p)), f"data.path {p!r} matches no file")
  frac = config.data.get("validation_fraction", 0.0)
  _need(0.0 <= frac < 1.0, f"data.validation_fraction={frac} must be in [0, 1)")
  _need(config.checkpoint.every_steps >= 1 and config.checkpoint.keep >= 1,
        "checkpoint.every_steps and checkpoint.keep must be >= 1")
  _need(config.eval.every_steps >= 1, "eval.every_steps must be >= 1")
