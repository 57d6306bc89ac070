"""The comparison's figures: accuracy vs k per method (error bars), and cross-k agreement bars per pair."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

_STYLE = {"base": ("grey", "x", ":"), "naive": ("tab:orange", "v", "--"), "oracle": ("tab:blue", "s", "-"),
          "phds_uniform": ("tab:green", "^", "-"), "phds_curriculum": ("tab:red", "o", "-")}


_ORACLE_K_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _style(method: str) -> tuple[str, str, str]:
  if method.startswith("oracle_k") and method[len("oracle_k"):].isdigit():  # single points, one color per K
    return _ORACLE_K_COLORS[int(method[len("oracle_k"):]) % len(_ORACLE_K_COLORS)], "D", "none"
  return _STYLE.get(method, ("black", "o", "-"))


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top  (lazy: slow to import, only plotting needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def accuracy_vs_k(t: dict[str, Any], path: str) -> str:
  """Mean accuracy with its 95% interval, per method; oracle_k{K} only at the k it is well-specified for."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8.5, 4.5))
  ks = t["ks"]
  methods = list(t["accuracy"])
  offsets = np.linspace(-0.15, 0.15, len(methods))
  for off, method in zip(offsets, methods):
    by_k = t["accuracy"][method]
    shown = [k for k in ks if not method.startswith("oracle_k") or k == int(method[len("oracle_k"):])]
    mean = np.array([by_k[k]["mean"] for k in shown])
    err = np.array([[by_k[k]["mean"] - by_k[k]["lo"] for k in shown], [by_k[k]["hi"] - by_k[k]["mean"]
                                                                         for k in shown]])
    color, marker, line = _style(method)
    ax.errorbar(np.array(shown) + off, mean, yerr=err, color=color, marker=marker, linestyle=line, capsize=3,
                label=method)
  ax.set(xlabel="k at evaluation (active experts per token)", ylabel=f"{t['task']} {t['metric']}",
         title=f"Accuracy vs k (selection: {t['rule']}; 95% CI over seeds × items)", xticks=ks)
  ax.axvline(t["k_pre"] / 2, color="black", alpha=0.2, linewidth=4, label="k_pre/2")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def agreement_bars(t: dict[str, Any], path: str) -> str:
  """Per pair (k1, k2): agreement of each checkpoint with itself across k, and of the separate oracles."""
  plt = _plt()
  pairs = sorted({tuple(a["pair"]) for a in t["agreement"]})
  rows = [r for r in t["agreement"] if r["kind"] == "oracle_pair" or not r["method"].startswith("oracle_k")]
  labels = sorted({_label(r) for r in rows}, key=lambda s: (s != "separate oracles", s))
  width = 0.8 / max(len(labels), 1)
  fig, ax = plt.subplots(figsize=(3.0 + 1.7 * len(pairs), 4.2))
  for j, label in enumerate(labels):
    xs, ys, err = [], [], [[], []]
    for i, pair in enumerate(pairs):
      match = [r for r in rows if tuple(r["pair"]) == pair and _label(r) == label]
      if match:
        r = match[0]
        xs.append(i + (j - (len(labels) - 1) / 2) * width)
        ys.append(r["mean"])
        err[0].append(r["mean"] - r["lo"])
        err[1].append(r["hi"] - r["mean"])
    color = "black" if label == "separate oracles" else _style(label)[0]
    ax.bar(xs, ys, width, yerr=err, capsize=3, color=color, alpha=0.8, label=label)
  ax.set(xticks=range(len(pairs)), xticklabels=[f"k={a} vs k={b}" for a, b in pairs], ylabel="agreement",
         title="Cross-k answer agreement (95% CI)")
  low = min((r["lo"] for r in rows), default=0.0)
  ax.set_ylim(max(0.0, low - 0.05), 1.0)  # agreement is high everywhere: zoom to where the bars differ
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def _label(row: dict) -> str:
  return "separate oracles" if row["kind"] == "oracle_pair" else row["method"]


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return path
