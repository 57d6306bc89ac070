"""Setting up a training run: one `Run` holding everything the fit, the export and the evaluation read.

`opened(config, workdir)` checks the config once (training/config_checks.py, which also builds the k plan),
opens the workdir and its checkpointer, stages remote inputs, loads the tokenizer once, resolves the schedule's
units, refuses an incompatible resume, builds the k schedule once, the mesh, the data iterators and the initial
weights. Nothing here compiles or touches the optimizer state on devices: training/fit.py does that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from phds_jax import checkpoint as params_ckpt
from phds_jax import data as data_lib
from phds_jax import hf, kplan, models, paths, sharding
from phds_jax.checkpoint import RunCheckpointer
from phds_jax.training import optimizer, protocol, resume, schedule
from phds_jax.training.config_checks import TrainConfigError, host_batch, validate_config


@dataclasses.dataclass
class Run:
  """One training run, set up. `config` is the resolved config (step counts, fractions) that checkpoints carry
  and a resume compares; `local` is the same with remote inputs replaced by local copies (what readers open)."""

  config: ml_collections.ConfigDict
  local: ml_collections.ConfigDict
  workdir: str
  is_main: bool  # process 0 writes logs, plots and exports
  plan: kplan.KPlan
  schedule: schedule.KSchedule
  mesh: Mesh
  tokenizer: data_lib.ChatTokenizer  # loaded once; evaluation gets its `.tokenizer`
  tokenizer_dir: str  # local; the HF export copies its files
  model_cfg: models.ModelConfig
  init_params: Any  # host weights until fit.py lays them out on the mesh (then None)
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  checkpointer: RunCheckpointer
  train_iter: Any
  heldout: list[dict[str, np.ndarray]]  # held-out batches, host side
  stats: data_lib.DataStats
  saved_meta: dict | None  # the newest readable checkpoint's metadata (None: a fresh start)
  changes: dict[str, tuple[Any, Any]]  # config changes a resume accepted


@contextlib.contextmanager
def opened(config: ml_collections.ConfigDict, workdir: str) -> Iterator[Run]:
  """The set-up run; its checkpointer is closed (pending saves finished) when the block ends."""
  plan = validate_config(config)
  workdir = open_workdir(workdir)
  ckpt = RunCheckpointer(paths.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                         async_save=config.checkpoint.async_save, verify=config.checkpoint.get("verify", True))
  try:
    yield _setup(config, workdir, plan, ckpt)
  finally:
    ckpt.close()


def _setup(config: ml_collections.ConfigDict, workdir: str, plan: kplan.KPlan, ckpt: RunCheckpointer) -> Run:
  local = local_inputs(config)  # remote inputs staged to local disk; `config` (saved, compared) keeps the URLs
  tokenizer_dir = local.get("tokenizer_dir") or local.init.path
  tokenizer = data_lib.ChatTokenizer.from_dir(tokenizer_dir, template=config.data.get("template", "auto"))
  config, units = protocol.resolve_for_run(config, tokenizer)  # epochs / steps -> the step counts used below
  logging.info("schedule: %s", units)
  saved_meta, changes = _resume_check(config, ckpt)
  sched = schedule.from_config(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  microbatches = config.microbatches
  rows = host_batch(config.batch_size)
  check_overlong(local, tokenizer)
  stats = data_lib.DataStats()
  train_iter = data_lib.make_dataset(data_config(local, rows, "train", num_epochs=None, seed=config.seed),
                                     tokenizer, stats=stats)
  heldout = []
  if config.data.get("validation_fraction", 0) > 0 and config.eval.batches > 0:
    val_iter = data_lib.make_dataset(data_config(local, rows // microbatches, "validation",
                                                 num_epochs=1, shuffle=False), tokenizer, stats=stats)
    heldout = [b for _, b in zip(range(config.eval.batches), val_iter)]

  model_cfg, params = load_init(local, jax.random.PRNGKey(config.seed))
  try:
    plan.check_model(model_cfg)
  except ValueError as e:
    raise TrainConfigError(f"init.path={config.init.path}: {e}") from None
  sharding.validate_mesh_for_model(mesh, model_cfg.num_experts)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise TrainConfigError(f"tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model only "
                           f"{model_cfg.vocab_size}", fix="set tokenizer_dir to the checkpoint's tokenizer")
  tx, lr_schedule = optimizer.make_optimizer(config, config.num_steps, params)
  return Run(config=config, local=local, workdir=workdir, is_main=jax.process_index() == 0, plan=plan,
             schedule=sched, mesh=mesh, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, model_cfg=model_cfg,
             init_params=params, tx=tx, lr_schedule=lr_schedule, checkpointer=ckpt, train_iter=train_iter,
             heldout=heldout, stats=stats, saved_meta=saved_meta, changes=changes)


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


def data_config(config, rows: int, part: str, **overrides) -> data_lib.DataConfig:
  """The data pipeline's config for `part`, reading `rows` rows per batch on this host."""
  return data_lib.as_config(config.data, batch_size=rows, part=part, **overrides)


def open_workdir(workdir: str) -> str:
  """The normalized workdir (URLs kept as URLs), created; storage errors name the path."""
  workdir = paths.normalize(workdir)
  try:
    paths.makedirs(workdir)
  except (ImportError, OSError) as e:
    raise TrainConfigError(f"workdir {workdir!r} cannot be created: {type(e).__name__}: {e}",
                           fix="check the path, its credentials, or the filesystem package its scheme needs "
                               "(gcsfs for gs://)") from e
  return workdir


def local_inputs(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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


def check_overlong(config, tokenizer) -> None:
  """With data.overlong='error', every record is tokenized once now, so an overlong one fails before training."""
  if config.data.get("overlong") != "error":
    return
  cfg = data_config(config, 1, "train", validation_fraction=0.0, num_epochs=1, shuffle=False)
  source = data_lib.load_source(cfg)
  tokenize = data_lib.Tokenize(tokenizer, cfg.max_len, "error", data_lib.DataStats(), cfg.on_error)
  for i in range(len(source)):
    tokenize(source[i])


def _resume_check(config, ckpt: RunCheckpointer) -> tuple[dict | None, dict]:
  """(newest readable checkpoint metadata, config changes), refused before anything loads (resume.py)."""
  for step in reversed(ckpt.all_steps()):
    saved = ckpt.read_meta(step)
    if saved is not None:
      return saved, resume.check(config, saved, step)
  return None, {}
