"""Every checkpoint read and written: params exports, a training run's verified steps, and any model directory.

  params    `save_params` / `load_params(dir, step=None)`: an export, or a run's step (manifest-verified);
            `load_model(dir)`: an HF directory or an export, whichever `dir` is
  run       `RunCheckpointer`: the trainer's steps (state, data position, metadata, manifest), resume, retention
  manifest  CRC32/shape/dtype of every array, compared on read-back
"""

from phds_jax.checkpoint.manifest import compare_manifests, manifest_of, shape_differences
from phds_jax.checkpoint.params import (CONFIG_FILE, PARAMS_DIR, config_from_json, config_to_json, load_model,
                                        load_params, read_config, save_params)
from phds_jax.checkpoint.run import BadCheckpoint, CheckpointSaveError, ResumeError, RunCheckpointer

__all__ = ["CONFIG_FILE", "PARAMS_DIR", "BadCheckpoint", "CheckpointSaveError", "ResumeError", "RunCheckpointer",
           "compare_manifests", "config_from_json", "config_to_json", "load_model", "load_params", "manifest_of",
           "read_config", "save_params", "shape_differences"]
