"""Minimal Orbax checkpoint of a parameter tree plus its ModelConfig.

Layout of `directory`: `params/` (an Orbax StandardCheckpointer tree) and `model_config.json`
(`dataclasses.asdict(cfg)`), so a checkpoint is self-describing without any HF files.
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

from phds_jax import paths
from phds_jax.models.config import ModelConfig

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


def load_params(directory: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, Any]:
  """(cfg, params) from `save_params`; with `dtype`, Orbax casts while restoring (no second full copy)."""
  root = paths.as_epath(directory)
  if not (root / CONFIG_FILE).is_file():
    raise FileNotFoundError(f"{root / CONFIG_FILE} not found: not a phds_jax params checkpoint")
  cfg = config_from_json((root / CONFIG_FILE).read_text())
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
