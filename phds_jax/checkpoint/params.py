"""The one reader of Orbax parameters: exported params checkpoints and a training run's steps.

An export (`save_params`): `params/` (an Orbax StandardCheckpointer tree) and `model_config.json`
(`dataclasses.asdict(cfg)`), so it is self-describing without any HF files; read with a plain restore.
A run's `checkpoints/` folder (checkpoint/run.py: RunCheckpointer) holds one TrainState per step with a
CRC manifest; `load_params(dir, step=N)` reads it through the same verified path the trainer resumes from, so a
damaged step is refused (BadCheckpoint) rather than scored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from phds_jax import hf, paths
from phds_jax.models.config import ModelConfig
from phds_jax.checkpoint.run import BadCheckpoint, RunCheckpointer

log = logging.getLogger(__name__)

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def config_to_json(cfg: ModelConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True) + "\n"


def config_from_json(text: str) -> ModelConfig:
  """Inverse of `config_to_json`; unknown keys (from a newer/older version) are dropped with a warning."""
  d = json.loads(text)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    log.warning("ignoring unknown ModelConfig fields %s", unknown)
  d = {key: value for key, value in d.items() if key in known}
  d["moe_layers"] = tuple(d.get("moe_layers", ()))  # JSON lists -> the hashable tuple the config holds
  return ModelConfig(**d)


def read_config(directory: str | os.PathLike) -> ModelConfig:
  """The ModelConfig of an export (its model_config.json; no array is read)."""
  file = paths.as_epath(directory) / CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f"{file} not found: not a phds_jax params checkpoint")
  return config_from_json(file.read_text())


def save_params(directory: str | os.PathLike, cfg: ModelConfig, params: Any, *,
                overwrite: bool = False) -> epath.Path:
  """Saves `params` with Orbax and `cfg` as JSON beside it; blocks until the write is committed.

  `directory` may be a URL (gs://...): paths go through etils.epath, never through os.path.abspath.
  """
  root = paths.as_epath(directory)
  root.mkdir(parents=True, exist_ok=True)
  with contextlib.closing(ocp.StandardCheckpointer()) as ckptr:
    ckptr.save(root / PARAMS_DIR, params, force=overwrite)
    ckptr.wait_until_finished()
  (root / CONFIG_FILE).write_text(config_to_json(cfg))
  return root


def load_params(directory: str | os.PathLike, dtype: Any = None, *,
                step: int | None = None) -> tuple[ModelConfig | None, Any]:
  """(cfg, params) of an export (`save_params`), or with `step` of a training run's checkpoints folder.

  Exports: with `dtype`, Orbax casts while restoring (no second full copy). Run steps: the whole TrainState is
  read and checked against its manifest (BadCheckpoint if it fails), then its params are returned (cast to
  `dtype` if given); cfg is None there, since a step holds no model config (the run's export has it).
  """
  if step is not None:
    return None, _load_run_step(directory, int(step), dtype)
  root = paths.as_epath(directory)
  cfg = read_config(root)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with contextlib.closing(ocp.StandardCheckpointer()) as ckptr:
    meta = ckptr.metadata(root / PARAMS_DIR).item_metadata
    meta = getattr(meta, "tree", meta)
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, jnp.dtype(dtype or m.dtype), sharding=device), meta)
    params = ckptr.restore(root / PARAMS_DIR, target)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
  return cfg, params


def _load_run_step(directory: str | os.PathLike, step: int, dtype: Any) -> Any:
  """The params of the TrainState saved at `step` under a run's checkpoints folder, manifest-verified."""
  step_dir = paths.as_epath(directory) / str(step)
  if not step_dir.is_dir():
    raise FileNotFoundError(f"{step_dir} not found: no checkpoint step {step} in {directory}")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  reader = RunCheckpointer(os.fspath(directory), async_save=False, read_only=True)
  try:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          reader.saved_shapes(step))
    try:
      state, _ = reader.read_verified(step, target)  # whole state: the manifest covers all of it
    except BadCheckpoint as e:
      raise BadCheckpoint(f"checkpoint step {step} in {directory}: {e}") from e
  finally:
    reader.close()
  params = state["params"]
  return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)


def load_model(directory: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, Any]:
  """(cfg, params) of either kind of model directory: an HF checkpoint (config.json + safetensors) or a params
  export (model_config.json + params/); `dtype` sets the param and the compute dtype.

  What the evaluator, the server and the latency profiler open a `--checkpoint` with.
  """
  root = paths.as_epath(directory)
  if (root / CONFIG_FILE).is_file():
    cfg, params = load_params(root, dtype=dtype)
  elif (root / "config.json").is_file():
    cfg, params = hf.load(os.fspath(root), dtype=dtype)
  else:
    raise FileNotFoundError(f"{root}: neither a HF checkpoint (config.json) nor a params checkpoint ({CONFIG_FILE})")
  return (cfg.replace(dtype=dtype) if dtype else cfg), params
