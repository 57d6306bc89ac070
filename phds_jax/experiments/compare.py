r"""PHDS against its baselines (docs/method.md §4): one command, every method × seed, one report.

    python -m phds_jax.experiments.compare --config=configs/compare_demo.py [--workdir=runs/compare_demo]

Runs, with the same data, steps and hyper-parameters for every trained method: the base without SFT, Naive,
Oracle (and Oracle-K for each base pretrained at K), PHDS without and with the curriculum (one run per anchor
in `config.anchors`, the anchor then chosen per seed on validation), each for every seed in `config.seeds`;
scores every selected checkpoint on every task in `eval.tasks` (multiple choice, perplexity, generation). Re-running with the same workdir skips finished runs and resumes an interrupted one. Writes
workdir/report.md, report.json, accuracy_vs_k.png and agreement.png.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import platform
import resource
import sys
import time
from typing import Any

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from phds_jax.experiments import config as cfg_lib
from phds_jax.experiments import plots, report, runs


def _machine() -> str:
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"{platform.platform()}, {cpus} CPU cores available, python {platform.python_version()}, "
          f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device)")


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache: later seeds of a method reuse the compiled train step instead of recompiling."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_all(config: ml_collections.ConfigDict, workdir: str, k_pre: int) -> tuple[list[dict[str, Any]], int]:
  """Every (method, seed) run's result.json contents, training and scoring whatever is not done yet; and how
  many runs this call actually executed."""
  ks = cfg_lib.eval_ks(config, k_pre)
  results, executed = [], 0
  for method in cfg_lib.methods(config, k_pre):
    for seed in config.seeds if method.trained else (0,):
      executed += runs.load_result(runs.run_dir(workdir, method.name, seed)) is None
      start = time.perf_counter()
      if method.trained:
        results.append(runs.run_trained(config, method, seed, workdir, ks))
      else:
        results.append(runs.run_base(config, method, workdir, ks))
      logging.info("%s seed %d done in %.0f s", method.name, seed, time.perf_counter() - start)
  return results, executed


def _timing(start: float, load_start: float) -> dict[str, Any]:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return dict(wall_seconds=time.perf_counter() - start, cpu_seconds=usage.ru_utime + usage.ru_stime,
              load_average=dict(start=load_start, end=os.getloadavg()[0]),  # other jobs slow the wall time
              timed_at=time.strftime("%Y-%m-%d %H:%M:%S"))


def _previous_timing(workdir: str) -> dict[str, Any] | None:
  """The timing of the last invocation that ran something (kept when the report is only rebuilt)."""
  try:
    with open(os.path.join(workdir, "report.json")) as f:
      meta = json.load(f)["meta"]
    return {k: meta[k] for k in ("wall_seconds", "cpu_seconds", "load_average", "timed_at", "command")}
  except (OSError, KeyError, ValueError):
    return None


def make_report(config: ml_collections.ConfigDict, workdir: str, results: list[dict[str, Any]], k_pre: int,
                meta: dict[str, Any]) -> dict[str, Any]:
  """Tables for both selection rules, claims, plots (of the primary rule); writes report.md / report.json."""
  ks = cfg_lib.eval_ks(config, k_pre)
  rules = {}
  for rule in cfg_lib.rules(config):
    t = report.build(workdir, results, rule=rule, ks=ks, k_pre=k_pre, pairs=[list(p) for p in config.report.pairs],
                     n_boot=config.report.n_boot, seed=config.report.seed, margin=config.report.get("margin", 0.02))
    t["claims"] = report.claims(t)
    rules[rule] = t
  primary = rules[config.select.primary]
  meta = dict(meta, primary_rule=config.select.primary, plots=[
      os.path.basename(plots.accuracy_vs_k(primary, os.path.join(workdir, "accuracy_vs_k.png"))),
      os.path.basename(plots.agreement_bars(primary, os.path.join(workdir, "agreement.png")))])
  out = dict(meta=meta, config=config.to_dict(), rules=rules,
             runs=[{k: v for k, v in r.items() if k != "val_by_step"} for r in results])
  report.write(workdir, out)
  return out


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Validates, runs every method × seed (resumable), and writes the report; returns its contents."""
  k_pre = cfg_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  enable_compilation_cache(config.get("compilation_cache", ""))
  start, load_start = time.perf_counter(), os.getloadavg()[0]
  results, executed = run_all(config, workdir, k_pre)
  meta = dict(command=config.get("command") or " ".join(["python -m phds_jax.experiments.compare"] + sys.argv[1:]),
              machine=_machine(), methods=[m.name for m in cfg_lib.methods(config, k_pre)],
              seeds=list(config.seeds), k_pre=k_pre,
              num_steps=max([r.get("num_steps", 0) for r in results] + [0]) or config.train.num_steps,
              train_seconds=sum(r["train_seconds"] for r in results),
              eval_seconds=sum(r["eval_seconds"] for r in results), runs_executed=executed)
  previous = None if executed else _previous_timing(workdir)
  meta.update(previous or _timing(start, load_start))
  return make_report(config, workdir, results, k_pre, meta)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Comparison config (configs/compare_demo.py).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default runs/<config.name>.")


class _OnlyOurInfo(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "phds_jax" in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  out = run_comparison(config, workdir)
  print(open(os.path.join(workdir, "report.md")).read())
  print(f"report: {os.path.join(workdir, 'report.md')} ({out['meta']['wall_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
