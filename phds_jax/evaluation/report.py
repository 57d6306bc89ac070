"""Writes and reads an evaluation directory.

    OUT/results.json                 EvalResults.summary (meta, tasks -> by_k -> metrics + CIs, agreement, average)
    OUT/results.md                   markdown tables: primary metric per task × k, relative drop, all metrics,
                                     agreement matrices
    OUT/samples/{task}_k{k}.jsonl    per-item records (MC: lls, is_greedy, preds, gold; ppl: ll and unit counts;
                                     generation: text, normalised pred, answers); ':' in task names becomes '_'
    OUT/accuracy_vs_k.png            primary metric vs k per task, MC average in bold; perplexity tasks in
                                     their own panel (one panel per kind present: a ppl-only run draws only it)
    OUT/agreement.png                agreement heatmaps across k: MC average, then each task
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from phds_jax.evaluation import metrics as M
from phds_jax.evaluation.results import EvalResults, Record


def sample_path(out_dir: str | os.PathLike, task: str, k: int) -> Path:
  return Path(out_dir) / "samples" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}_k{k}.jsonl"


def _finite(x: Any) -> Any:
  """NaN / inf -> None, so results.json stays strict JSON (e.g. a relative drop against a zero accuracy)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def write(out_dir: str | os.PathLike, results: EvalResults, plots: bool = True) -> Path:
  out = Path(out_dir)
  (out / "samples").mkdir(parents=True, exist_ok=True)
  summary = _finite(results.summary)
  (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
  for task, by_k in results.samples.items():
    for k, records in by_k.items():
      with sample_path(out, task, k).open("w", encoding="utf-8") as f:
        for r in records:
          f.write(json.dumps(r, ensure_ascii=False) + "\n")
  (out / "results.md").write_text(markdown(summary))
  if plots:
    plot(summary, out)
  return out


def load_summary(out_dir: str | os.PathLike) -> dict[str, Any]:
  return json.loads((Path(out_dir) / "results.json").read_text())


def load_samples(out_dir: str | os.PathLike, task: str, k: int) -> list[Record]:
  with sample_path(out_dir, task, k).open(encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def predictions(records: list[Record]) -> dict[str, Any]:
  """item id -> chosen answer (the primary metric's), the input of `metrics.align` for agreement."""
  return {r["id"]: r["pred"] for r in records}


def correctness(records: list[Record], metric: str) -> dict[str, int]:
  """item id -> 0/1 under `metric`, the input of `metrics.align` + `metrics.paired_bootstrap`."""
  return {r["id"]: r["correct"][metric] for r in records}


def agreement_between(dir_a: str | os.PathLike, k_a: int, dir_b: str | os.PathLike, k_b: int, task: str, *,
                      n_boot: int = M.N_BOOT, seed: int = 0) -> dict[str, Any]:
  """Agreement of two evaluation runs (e.g. Oracle-k1@k1 vs Oracle-k2@k2) on the items they share, with CI."""
  a, b = M.align(predictions(load_samples(dir_a, task, k_a)), predictions(load_samples(dir_b, task, k_b)))
  same = M.agreement_indicators(a, b)
  return {"agreement": float(same.mean()), "ci": list(M.bootstrap_ci(same, n_boot=n_boot, seed=seed)),
          "n": int(same.size)}


# --------------------------------------------------------------------------------------------- markdown


def _fmt(value: float, ci: list[float] | None = None) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  text = f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
  return f"{text} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                          for r in rows]


def markdown(summary: dict[str, Any]) -> str:
  meta, tasks, avg = summary["meta"], summary["tasks"], summary.get("average") or {}
  ks = meta["ks"]
  kcols = [f"k={k}" for k in ks]
  lines = ["# Evaluation results", "",
           f"Checkpoint: `{meta.get('checkpoint', '(in memory)')}`; model {meta['model_type']}, "
           f"k_pre={meta['k_pre']}; limit={meta['limit']}; max_length={meta['max_length']}; "
           f"95% bootstrap CIs ({meta['n_boot']} resamples, seed {meta['seed']}).", "",
           ]
  if meta.get("incomplete"):
    inc = meta["incomplete"]
    lines += [f"**Incomplete:** task `{inc['failed_task']}` failed ({inc['error']}); not run: "
              f"{', '.join(inc['not_run'])}. The tables hold the tasks that finished.", ""]
  lines += ["## Primary metric", ""]
  rows = [[name, t["primary"], str(t["n"])] + [_fmt(t["by_k"][str(k)][t["primary"]],
                                                     t["by_k"][str(k)].get(f"{t['primary']}_ci")) for k in ks]
          for name, t in tasks.items()]
  if avg:
    rows.append(["**MC average**", "primary", str(len(avg["tasks"]))] + [_fmt(avg["by_k"][str(k)]) for k in ks])
  lines += _table(["task", "metric", "n"] + kcols, rows)
  lines += ["", f"## Relative change vs k={meta['k_ref']}", "",
            "Accuracy: (acc@k_ref − acc@k)/acc@k_ref; perplexity: (ppl@k − ppl@k_ref)/ppl@k_ref.", ""]
  rows = []
  for name, t in list(tasks.items()) + ([("**MC average**", avg)] if avg else []):
    change = t.get("relative_drop") or t.get("relative_increase") or {}
    rows.append([name] + [_fmt(change.get(str(k))) for k in ks])
  lines += _table(["task"] + kcols, rows)
  lines += ["", "## All metrics", ""]
  rows = [[name, m] + [_fmt(t["by_k"][str(k)][m], t["by_k"][str(k)].get(f"{m}_ci")) for k in ks]
          for name, t in tasks.items() for m in t["metrics"]]
  lines += _table(["task", "metric"] + kcols, rows)
  lines += ["", "## Agreement across k (share of items with the same chosen answer)", ""]
  for name, t in ([("MC average", avg)] if avg else []) + list(tasks.items()):
    if "agreement" in t:
      a = t["agreement"]
      lines += [f"**{name}**", ""] + _table(
          [""] + [f"k={k}" for k in a["ks"]],
          [[f"k={k}"] + [f"{v:.4f}" for v in row] for k, row in zip(a["ks"], a["matrix"])]) + [""]
  prompts = [f"- `{name}` ({t['source']}): {t['prompt']}" for name, t in tasks.items()]
  return "\n".join(lines + ["## Prompts", ""] + prompts) + "\n"


# ------------------------------------------------------------------------------------------------ plots


def metric_panels(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """(y label, {task: entry}) per panel of accuracy_vs_k.png: one per kind of task present, none left empty."""
  tasks = summary["tasks"]
  scored = {n: t for n, t in tasks.items() if t["kind"] != "ppl"}
  ppl = {n: t for n, t in tasks.items() if t["kind"] == "ppl"}
  return ([("accuracy", scored)] if scored else []) + ([("perplexity", ppl)] if ppl else [])


def plot(summary: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
  # matplotlib is imported here, not at the top: it takes seconds to import and only plotting needs it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out, ks, tasks = Path(out_dir), summary["meta"]["ks"], summary["tasks"]
  avg = summary.get("average") or {}
  scored = {n: t for n, t in tasks.items() if t["kind"] != "ppl"}
  panels = metric_panels(summary)
  fig, axes = plt.subplots(1, len(panels), figsize=(1 + 5 * len(panels), 4.5), squeeze=False)
  for ax, (ylabel, group) in zip(axes.flat, panels):
    for name, t in group.items():
      ax.plot(ks, [t["by_k"][str(k)][t["primary"]] for k in ks], marker="o", label=f"{name} ({t['primary']})")
    if ylabel == "accuracy" and avg:
      ax.plot(ks, [avg["by_k"][str(k)] for k in ks], marker="s", color="black", linewidth=2.5, label="MC average")
    ax.set(xlabel="k (active experts per token)", ylabel=ylabel, title=f"{ylabel.capitalize()} vs k", xticks=ks)
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths = [out / "accuracy_vs_k.png"]
  fig.savefig(paths[0], dpi=120)
  plt.close(fig)

  panels = ([("MC average", avg["agreement"])] if avg else []) + [
      (n, t["agreement"]) for n, t in scored.items() if "agreement" in t]
  if panels:
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
      ax.axis("off")
    for ax, (name, a) in zip(axes.flat, panels):
      m = np.asarray(a["matrix"])
      im = ax.imshow(m, vmin=min(0.5, float(m.min())), vmax=1.0, cmap="viridis")
      ax.set(title=name, xticks=range(len(a["ks"])), yticks=range(len(a["ks"])),
             xticklabels=a["ks"], yticklabels=a["ks"], xlabel="k", ylabel="k")
      for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.8 else "black")
      fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths.append(out / "agreement.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
  return paths
