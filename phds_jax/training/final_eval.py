"""Evaluating the exported checkpoint at every k: `config.final_eval.tasks`, held-out losses and the run's plots."""

from __future__ import annotations

import json
import os
from typing import Any

from phds_jax import evaluation, paths
from phds_jax.training import observe
from phds_jax.training.run import Run


def evaluate_tasks(run: Run, params: Any) -> dict[str, dict[int, float]]:
  """Runs `config.final_eval.tasks` (phds_jax.evaluation specs) at the plan's final ks; results under
  workdir/eval. Returns task -> k -> primary metric."""
  fe = run.config.final_eval
  if not fe.tasks:
    return {}
  results = evaluation.evaluate(run.model_cfg, params, run.tokenizer.tokenizer, list(fe.tasks),
                                ks=run.plan.final_eval_ks, limit=fe.limit or None, batch_size=fe.batch_size,
                                out_dir=os.path.join(run.workdir, "eval"), progress=True)
  return {task: {int(k): v[entry["primary"]] for k, v in entry["by_k"].items()}
          for task, entry in results.summary["tasks"].items()}


def write_heldout(run: Run, k_histogram: dict[int, int], heldout_by_k: dict[int, float]) -> None:
  """The run's plots and heldout_by_k.json."""
  observe.plot_run(run.workdir, k_histogram, heldout_by_k)
  paths.write_text(paths.join(run.workdir, "heldout_by_k.json"),
                   json.dumps({str(k): v for k, v in heldout_by_k.items()}, indent=1))
