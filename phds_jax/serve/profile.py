"""The latency/accuracy Pareto profile of one checkpoint on this machine, and what the server reads from it.

    python -m phds_jax.serve.profile --checkpoint=DIR [--eval_results=EVAL/results.json] --out=pareto.json

times the server's own decode step (`engine.time_decode`) at every k, at batch 1 and at --max_batch, joins each
k's accuracy from an evaluator results.json (`python -m phds_jax.eval`), and writes pareto.json plus a plot
beside it (pareto.png: per-token latency vs accuracy, one point per k). The server's `--profile` reads the batch-1
p50 of each k (`load_profile`) to answer requests that give a `latency_budget_ms` instead of a k.

pareto.json:
    {"checkpoint", "model_type", "k_pre", "dtype", "machine": {device_kind, platform, device_count,
     jax_version, hostname, cpu_count, date}, "settings": {context_len, new_tokens, repeats, max_batch},
     "accuracy_source": {results, task, metric, higher_is_better} | null,
     "points": [{"k", "batch_1": {p50_ms, p99_ms, tokens_per_s}, "batch_max": {batch_size, p50_ms, p99_ms,
                 tokens_per_s}, "accuracy", "pareto_optimal"}]}
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from phds_jax import checkpoint, kplan
from phds_jax.serve.engine import time_decode

FLAGS = flags.FLAGS
FORMAT_VERSION = 1


class ProfileError(ValueError):
  """A pareto.json or results.json that cannot be used; the message names the file."""


def define_flags(fv: flags.FlagValues = FLAGS) -> flags.FlagValues:
  """Defines the CLI flags on `fv` (only when run as a script; tests pass a fresh FlagValues)."""
  kw = {"flag_values": fv}
  flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint dir (or phds_jax params checkpoint).",
                      required=True, **kw)
  flags.DEFINE_string("eval_results", None, "results.json of `python -m phds_jax.eval` on this checkpoint "
                      "(optional: without it the profile is latency only).", **kw)
  flags.DEFINE_string("task", None, "Task whose primary metric is the accuracy (default: the multiple-choice "
                      "average, or the only task).", **kw)
  flags.DEFINE_string("metric", None, "Metric of --task (default: its primary metric).", **kw)
  flags.DEFINE_string("out", None, "Output pareto.json (the plot goes beside it as <name>.png).", required=True,
                      **kw)
  flags.DEFINE_list("ks", None, "k levels to time (default 1..k_pre).", **kw)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Parameter and compute dtype: "
                    "use the one the server will run.", **kw)
  flags.DEFINE_integer("max_batch", 8, "The second batch size timed (the server's --max_batch).", **kw)
  flags.DEFINE_integer("steps_per_call", 1, "Tokens per decode dispatch (the server's --steps_per_call).",
                       lower_bound=1, **kw)
  flags.DEFINE_integer("context_len", 128, "Tokens in the cache while decoding.", **kw)
  flags.DEFINE_integer("new_tokens", 32, "Decode steps timed per repeat.", **kw)
  flags.DEFINE_integer("repeats", 3, "Repeats (samples = repeats x new_tokens).", **kw)
  flags.DEFINE_bool("plot", True, "Write the PNG plot.", **kw)
  return fv


# ------------------------------------------------------------------------------------------------ reading


def load_profile(path: str | os.PathLike) -> dict[int, float]:
  """k -> p50 ms per decoded token at batch 1, from a pareto.json (what `latency_budget_ms` is checked against)."""
  file = Path(path)
  try:
    data = json.loads(file.read_text())
    out = {int(p["k"]): float(p["batch_1"]["p50_ms"]) for p in data["points"]}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ProfileError(f"{file}: not a pareto.json from phds_jax.serve.profile ({type(e).__name__}: {e})") from e
  if not out:
    raise ProfileError(f"{file}: no points")
  return out


def accuracy_by_k(results: dict[str, Any], task: str | None = None,
                  metric: str | None = None) -> tuple[dict[int, float], dict[str, Any]]:
  """(k -> accuracy, where it came from) from an evaluator summary (results.json).

  Default: the multiple-choice average when there is one, else the only task's primary metric; with several
  tasks and no MC average, `task` must say which.
  """
  tasks = results.get("tasks") or {}
  average = results.get("average") or {}
  if task is None and metric is None and average.get("by_k"):
    values, name, metric, higher = average["by_k"], "MC average", "primary", True
  else:
    if task is None:
      if len(tasks) != 1:
        raise ProfileError(f"results hold tasks {sorted(tasks)} and no multiple-choice average: pass --task")
      task = next(iter(tasks))
    if task not in tasks:
      raise ProfileError(f"task {task!r} is not in the results (tasks: {sorted(tasks)})")
    entry = tasks[task]
    metric = metric or entry["primary"]
    if metric not in entry.get("metrics", [metric]):
      raise ProfileError(f"task {task!r} has no metric {metric!r} (metrics: {entry.get('metrics')})")
    values = {k: by[metric] for k, by in entry["by_k"].items()}
    name, higher = task, entry.get("kind") != "ppl"
  accuracy = {int(k): float(v) for k, v in values.items() if v is not None}
  return accuracy, {"task": name, "metric": metric, "higher_is_better": higher}


def pareto_optimal(points: Sequence[dict[str, Any]], higher_is_better: bool = True) -> list[bool]:
  """Whether each point is on the frontier: no other k is at least as fast and as accurate, and better in one."""
  def key(p):
    acc = p.get("accuracy")
    return p["batch_1"]["p50_ms"], (None if acc is None else (acc if higher_is_better else -acc))

  out = []
  for p in points:
    t, a = key(p)
    dominated = a is not None and any(
        q is not p and b is not None and s <= t and b >= a and (s < t or b > a) for q in points for s, b in [key(q)])
    out.append(not dominated)
  return out


# ------------------------------------------------------------------------------------------------ measuring


def machine_info() -> dict[str, Any]:
  devices = jax.devices()
  return {"device_kind": devices[0].device_kind, "platform": jax.default_backend(), "device_count": len(devices),
          "jax_version": jax.__version__, "hostname": platform.node(), "cpu_count": os.cpu_count(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _stats(ms: Any, batch_size: int) -> dict[str, float]:
  p50 = float(np.percentile(ms, 50))
  return {"p50_ms": round(p50, 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
          "tokens_per_s": round(batch_size * 1e3 / p50, 2)}


def measure(cfg: Any, params: Any, ks: Sequence[int], *, max_batch: int, context_len: int, new_tokens: int,
            repeats: int, steps_per_call: int = 1) -> list[dict[str, Any]]:
  """Per-token latency of each k at batch 1 and at `max_batch` (the server's decode step)."""
  points = []
  for k in ks:
    point: dict[str, Any] = {"k": k}
    for name, batch in (("batch_1", 1), ("batch_max", max_batch)):
      ms = time_decode(cfg, params, k=k, batch_size=batch, context_len=context_len, new_tokens=new_tokens,
                       repeats=repeats, steps_per_call=steps_per_call)
      point[name] = ({"batch_size": batch} if name == "batch_max" else {}) | _stats(ms, batch)
    logging.info("k=%d: %s ms/token at batch 1, %s at batch %d", k, point["batch_1"]["p50_ms"],
                 point["batch_max"]["p50_ms"], max_batch)
    points.append(point)
  return points


def build(cfg: Any, points: list[dict[str, Any]], *, checkpoint: str, dtype: str, settings: dict[str, Any],
          accuracy: dict[int, float] | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
  """The pareto.json document: measured points joined with accuracy per k (None where not evaluated)."""
  for p in points:
    p["accuracy"] = None if accuracy is None else accuracy.get(p["k"])
  higher = True if source is None else source["higher_is_better"]
  for p, on in zip(points, pareto_optimal(points, higher)):
    p["pareto_optimal"] = on
  return {"format_version": FORMAT_VERSION, "checkpoint": checkpoint, "model_type": cfg.model_type,
          "k_pre": cfg.k_pre, "dtype": dtype, "machine": machine_info(), "settings": settings,
          "accuracy_source": source, "points": points}


def plot(doc: dict[str, Any], path: str | os.PathLike) -> Path:
  """Per-token latency (batch 1, p50 with the p99 as an error bar) against accuracy, one labelled point per k;
  latency only (vs k) when no accuracy was joined."""
  # Lazy: the server imports this module for `load_profile` at start-up and never plots; pyplot costs a
  # noticeable part of a second and picks a backend, which only a plot should do.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  points, source = doc["points"], doc.get("accuracy_source")
  fig, ax = plt.subplots(figsize=(6, 4.5))
  lat = [p["batch_1"]["p50_ms"] for p in points]
  err = [p["batch_1"]["p99_ms"] - p["batch_1"]["p50_ms"] for p in points]
  with_acc = source is not None and any(p["accuracy"] is not None for p in points)
  if with_acc:
    shown = [p for p in points if p["accuracy"] is not None]
    xs, ys = [p["batch_1"]["p50_ms"] for p in shown], [p["accuracy"] for p in shown]
    ax.errorbar(xs, ys, xerr=[[0] * len(shown), [p["batch_1"]["p99_ms"] - p["batch_1"]["p50_ms"] for p in shown]],
                fmt="o", capsize=3, color="tab:blue")
    front = sorted((p for p in shown if p["pareto_optimal"]), key=lambda p: p["batch_1"]["p50_ms"])
    ax.plot([p["batch_1"]["p50_ms"] for p in front], [p["accuracy"] for p in front], "--", color="tab:gray",
            label="Pareto front")
    for p, x, y in zip(shown, xs, ys):
      ax.annotate(f"k={p['k']:d}", (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set(xlabel="ms per decoded token (batch 1, p50; bar to p99)",
           ylabel=("MC average accuracy" if source["metric"] == "primary" else f"{source['task']} ({source['metric']})"),
           title="Accuracy vs latency per k")
    ax.legend(fontsize=8)
  else:
    ks = [p["k"] for p in points]
    ax.errorbar(ks, lat, yerr=[[0] * len(points), err], fmt="o-", capsize=3, label="batch 1")
    ax.plot(ks, [p["batch_max"]["p50_ms"] for p in points], "s-",
            label=f"batch {points[0]['batch_max']['batch_size']}")
    ax.set(xlabel="k (active experts per token)", ylabel="ms per decode step (p50)", title="Latency vs k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
  machine = doc["machine"]
  fig.text(0.01, 0.01, f"{machine['device_kind']} | jax {machine['jax_version']} | {doc['dtype']}", fontsize=7,
           color="gray")
  fig.tight_layout()
  out = Path(path)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def run(fv: flags.FlagValues = FLAGS) -> dict[str, Any]:
  """Measures, joins and writes --out (and the plot); returns the pareto.json document."""
  accuracy = source = None
  if fv.eval_results:
    file = Path(fv.eval_results)
    if file.is_dir():
      file = file / "results.json"
    try:
      results = json.loads(file.read_text())
    except (OSError, ValueError) as e:
      raise ProfileError(f"{file}: cannot read evaluator results ({e})") from e
    accuracy, source = accuracy_by_k(results, fv.task, fv.metric)
    source = {"results": str(file.absolute()), **source}
  cfg, params = checkpoint.load_model(fv.checkpoint, dtype=fv.dtype)
  ks = sorted({int(k) for k in fv.ks}) if fv.ks else kplan.default_ks(cfg.k_pre)
  bad = kplan.ks_outside(ks, cfg.k_pre)
  if bad:
    raise app.UsageError(f"--ks {bad} outside [1, k_pre={cfg.k_pre}]")
  if accuracy is not None and not set(ks) & set(accuracy):
    raise ProfileError(f"{fv.eval_results}: no accuracy for any of k {ks} (evaluated: {sorted(accuracy)})")
  settings = {"context_len": fv.context_len, "new_tokens": fv.new_tokens, "repeats": fv.repeats,
              "max_batch": fv.max_batch, "steps_per_call": fv.steps_per_call}
  points = measure(cfg, params, ks, max_batch=fv.max_batch, context_len=fv.context_len,
                   new_tokens=fv.new_tokens, repeats=fv.repeats, steps_per_call=fv.steps_per_call)
  doc = build(cfg, points, checkpoint=str(Path(fv.checkpoint).absolute()), dtype=fv.dtype, settings=settings,
              accuracy=accuracy, source=source)
  out = Path(fv.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(doc, indent=2) + "\n")
  if fv.plot:
    plot(doc, out.with_suffix(".png"))
  return doc


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    doc = run(FLAGS)
  except (OSError, ValueError) as e:  # missing files, unusable results.json: one line, no traceback
    raise app.UsageError(f"{type(e).__name__}: {e}") from e
  for p in doc["points"]:
    print(f"k={p['k']}: {p['batch_1']['p50_ms']:.3f} ms/token (p99 {p['batch_1']['p99_ms']:.3f}) at batch 1, "
          f"{p['batch_max']['p50_ms']:.3f} ms at batch {p['batch_max']['batch_size']}, accuracy {p['accuracy']}"
          + (" (Pareto-optimal)" if p["pareto_optimal"] else ""))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
