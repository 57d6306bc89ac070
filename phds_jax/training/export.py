"""Exporting the run's one checkpoint: which state (the last step, or the selected one) and its files.

The exported weights go to `final/orbax` (Orbax params) and `final/hf` (a Hugging Face directory with the run's
tokenizer files); a remote workdir gets the HF files copied through epath.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from phds_jax import checkpoint as params_ckpt
from phds_jax import hf, paths
from phds_jax.training import step as step_lib
from phds_jax.training.fit import Fitted
from phds_jax.training.run import Run


def exported_state(run: Run, fitted: Fitted) -> tuple[step_lib.TrainState, int]:
  """(state, step) to export: the selector's step with select.export='selected', else the last one."""
  best = fitted.selector.best_step
  if run.config.select.export == "selected" and best not in (None, fitted.final_step):
    state, _ = run.checkpointer.read_verified(best, fitted.state)
    return state, best
  return fitted.state, fitted.final_step


def write(run: Run, params_host: Any) -> tuple[str | None, str | None]:
  """(orbax_dir, hf_dir) written as `config.export` asks (None where not)."""
  orbax_dir = hf_dir = None
  if run.config.export.orbax:
    orbax_dir = str(params_ckpt.save_params(paths.join(run.workdir, "final", "orbax"), run.model_cfg, params_host,
                                            overwrite=True))
  if run.config.export.hf:
    hf_dir = _export_hf(paths.join(run.workdir, "final", "hf"), run.model_cfg, params_host, run.tokenizer_dir)
  return orbax_dir, hf_dir


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
