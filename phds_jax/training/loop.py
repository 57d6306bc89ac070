"""`train_and_evaluate(config, workdir)`: the PHDS fine-tuning run, usable from a notebook or `phds_jax.train`.

It reads top to bottom as the run's four phases, each in the module named after it:

  setup     training/run.py: config checks and the k plan, workdir, inputs, tokenizer (loaded once), schedule,
            mesh, data, initial weights; a resume is checked before anything loads
  fit       training/fit.py: the steps (one compiled step over every k level), held-out losses, selection,
            verified checkpoints, skipped non-finite updates
  export    training/export.py: the last (or selected) step as Orbax params and an HF directory
  evaluate  training/final_eval.py: held-out loss and `final_eval.tasks` at every k, plots
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import ml_collections

from phds_jax.training import export, final_eval
from phds_jax.training import run as run_lib
from phds_jax.training.fit import TrainingDiverged, fit, heldout_losses, write_data_stats

__all__ = ["RunResult", "TrainingDiverged", "train_and_evaluate"]


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Runs (or resumes) the configured training in `workdir`; returns the final per-k held-out losses."""
  with run_lib.opened(config, workdir) as run:
    with jax.set_mesh(run.mesh):
      fitted = fit(run)
      state, exported_step = export.exported_state(run, fitted)
      heldout = (heldout_losses(fitted.eval_fn, state.params, fitted.heldout, run.plan.heldout_ks)
                 if fitted.heldout else {})
    result = RunResult(run.workdir, fitted.final_step, heldout, fitted.k_histogram, {}, None, None,
                       fitted.selector.best_step)
    if not run.is_main:
      return result
    write_data_stats(run.workdir, run.stats, fitted.start, fitted.final_step)
    fitted.selector.write(run.workdir, exported_step)
    params_host = jax.device_get(state.params)
    result.orbax_dir, result.hf_dir = export.write(run, params_host)
    result.accuracy_by_k = final_eval.evaluate_tasks(run, params_host)
    final_eval.write_heldout(run, fitted.k_histogram, heldout)
    logging.info("finished at step %d (last checkpoint %d, %d update(s) skipped as non-finite)",
                 fitted.final_step, fitted.last_saved, int(state.skipped))
    return result
