"""One (method, seed) of the comparison: SFT (resumable), checkpoint selection, multiple-choice scoring.

Layout of `workdir/<method>/seed<s>/`:
  metrics.jsonl, checkpoints/, final/orbax   the trainer's run (phds_jax.training.loop)
  eval/step<N>/                               phds_jax.evaluation output of the checkpoint at step N
  result.json                                 selection (steps, validation scores) and the primary metric per
                                              rule, task and k; its presence = done
  fingerprint.json                            the settings the run was made with (a mismatch is an error)

The untrained base is scored once, under `workdir/base/seed0/` (it has no seed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from phds_jax import checkpoint as params_ckpt
from phds_jax import evaluation, hf
from phds_jax.experiments import config as cfg_lib
from phds_jax.experiments import selection
from phds_jax.training.loop import train_and_evaluate
from phds_jax.training.observe import read_metrics

RESULT = "result.json"
FINGERPRINT = "fingerprint.json"


def run_dir(workdir: str, method: str, seed: int) -> str:
  return os.path.join(workdir, method, f"seed{seed}")


def load_result(path: str) -> dict[str, Any] | None:
  file = os.path.join(path, RESULT)
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    return json.load(f)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # atomic: a killed run never leaves a half-written result that looks done


def fingerprint(config: ml_collections.ConfigDict, train: ml_collections.ConfigDict | None) -> dict[str, Any]:
  """What a run's results depend on: its training config and the scoring / selection settings."""
  return json.loads(json.dumps(dict(train=None if train is None else train.to_dict(), eval=config.eval.to_dict(),
                                    select=config.select.to_dict(), n_boot=config.report.n_boot), default=str))


def check_fingerprint(path: str, expected: dict[str, Any]) -> None:
  """Refuses to resume or reuse a run made with other settings (a silent mix would corrupt the tables)."""
  file = os.path.join(path, FINGERPRINT)
  if os.path.isfile(file):
    with open(file) as f:
      found = json.load(f)
    if found != expected:
      raise cfg_lib.ComparisonConfigError(
          f"{path} was run with different settings than this config; use a fresh --workdir or delete it")
  else:
    os.makedirs(path, exist_ok=True)
    _write_json(file, expected)


def saved_steps(ckpt_dir: str) -> list[int]:
  """Completed checkpoint steps (Orbax renames a step folder only once it is fully written)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(p.name) for p in Path(ckpt_dir).iterdir() if p.is_dir() and p.name.isdigit())


def restore_params(ckpt_dir: str, step: int) -> Any:
  """The parameters of the trainer's TrainState saved at `step` (manifest-verified), as host arrays."""
  return jax.device_get(params_ckpt.load_params(ckpt_dir, step=step)[1])


def evaluate_checkpoint(config: ml_collections.ConfigDict, model_cfg, params, tokenizer_dir: str,
                        ks: list[int], out_dir: str) -> dict[str, dict[int, float]]:
  """Scores one checkpoint on every test task at every k (writes phds_jax.evaluation's directory);
  task -> k -> primary metric."""
  e = config.eval
  results = evaluation.evaluate(model_cfg, params, hf.load_tokenizer(tokenizer_dir), cfg_lib.tasks(config),
                                ks=ks, limit=e.limit or None, batch_size=e.batch_size, out_dir=out_dir,
                                n_boot=config.report.n_boot, progress=False, plots=False,
                                max_new_tokens=e.get("max_new_tokens", 32), data_dir=e.get("data_dir") or None)
  return {name: {int(k): float(v[entry["primary"]]) for k, v in entry["by_k"].items()}
          for name, entry in results.summary["tasks"].items()}


def _eval_dir(path: str, step: int | str) -> str:
  return os.path.join(path, "eval", f"step{step}")


def run_base(config: ml_collections.ConfigDict, method: cfg_lib.Method, workdir: str,
             ks: list[int]) -> dict[str, Any]:
  """Scores the untrained base at every k (once; it has no seed)."""
  path = run_dir(workdir, method.name, 0)
  check_fingerprint(path, fingerprint(config, None))
  done = load_result(path)
  if done is not None:
    return done
  start = time.perf_counter()
  model_cfg, params = hf.load(method.init_path)
  model_cfg = model_cfg.replace(**_eval_overrides(config))
  out = _eval_dir(path, 0)
  acc = evaluate_checkpoint(config, model_cfg, params, method.init_path, ks, out)
  rules = cfg_lib.rules(config)
  result = dict(method=method.name, seed=0, k_pre=method.k_pre, steps={r: 0 for r in rules},
                eval_dirs={r: out for r in rules}, accuracy={r: acc for r in rules}, val_score={},
                train_seconds=0.0, eval_seconds=time.perf_counter() - start)
  _write_json(os.path.join(path, RESULT), _relative(result, workdir))
  return load_result(path)


def _eval_overrides(config: ml_collections.ConfigDict) -> dict:
  """dtype overrides of the training recipe, so the base is scored with the same numerics as SFT runs."""
  return {k: v for k, v in dict(config.train.model).items() if k in ("dtype", "param_dtype")}


def _relative(result: dict, workdir: str) -> dict:
  """Stores eval dirs relative to the workdir, so a copied or moved workdir still reads back."""
  result = dict(result)
  result["eval_dirs"] = {r: os.path.relpath(p, workdir) for r, p in result["eval_dirs"].items()}
  return result


def run_trained(config: ml_collections.ConfigDict, method: cfg_lib.Method, seed: int, workdir: str,
                ks: list[int]) -> dict[str, Any]:
  """Trains (or resumes), selects a step per rule, scores each selected checkpoint; skipped if done."""
  path = run_dir(workdir, method.name, seed)
  tc = cfg_lib.train_config(config, method, seed)
  check_fingerprint(path, fingerprint(config, tc))
  done = load_result(path)
  if done is not None:
    return done
  start = time.perf_counter()
  result = train_and_evaluate(tc, path)
  train_s = time.perf_counter() - start
  ckpt_dir = os.path.join(path, "checkpoints")
  signal = config.select.signal
  records = read_metrics(path)
  vals = selection.val_by_step(records, signal)
  sel_ks = list(config.select.ks) or list(config.k_train)
  steps = selection.select_all(vals, cfg_lib.rules(config), k_pre=method.k_pre, ks=sel_ks,
                               burn_in_steps=int(config.select.burn_in_steps), signal=signal,
                               available=saved_steps(ckpt_dir))
  # The validation score of each selected step (what a sweep over anchors compares; higher is better).
  sign = 1.0 if selection.SIGNALS[signal][1] else -1.0
  val_score = {r: sign * selection.score(vals[s], r, method.k_pre, sel_ks) for r, s in steps.items()}
  model_cfg = params_ckpt.read_config(result.orbax_dir)
  start = time.perf_counter()
  accuracy, eval_dirs = {}, {}
  for step in sorted(set(steps.values())):
    out = _eval_dir(path, step)
    acc = evaluate_checkpoint(config, model_cfg, restore_params(ckpt_dir, step), tc.tokenizer_dir, ks, out)
    for rule in [r for r, s in steps.items() if s == step]:
      accuracy[rule], eval_dirs[rule] = acc, out
  losses = selection.val_by_step(records, "loss")
  out = dict(method=method.name, seed=int(seed), k_pre=method.k_pre, num_steps=result.final_step, steps=steps,
             eval_dirs=eval_dirs,
             accuracy=accuracy, val_score=val_score, select_signal=signal, train_seconds=train_s,
             eval_seconds=time.perf_counter() - start,
             val_by_step={str(s): {str(k): v for k, v in d.items()} for s, d in sorted(losses.items())},
             select_by_step={str(s): {str(k): v for k, v in d.items()} for s, d in sorted(vals.items())})
  _write_json(os.path.join(path, RESULT), _relative(out, workdir))
  if not config.keep_checkpoints:
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the selected steps are scored; result.json marks it done
  logging.info("%s seed %d: steps %s, validation %s", method.name, seed, steps,
               {r: round(v, 4) for r, v in val_score.items()})
  return load_result(path)
