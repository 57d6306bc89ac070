"""From per-item results of every (method, seed) to the comparison's tables (pure numpy, no I/O).

Uncertainty is over both sources the paper's single-run tables leave out: training seeds and test items. A
two-level bootstrap resamples seeds (with replacement, within each method) and items (with replacement, the
same items for every method in a comparison, so item difficulty cancels in differences). Intervals are 95%
percentile intervals (90% ones too, for equivalence tests: TOST at α = 0.05 is the 90% CI inside ±δ);
p-values are the bootstrap sign test of `metrics.paired_bootstrap`.

Several tasks are pooled with per-item `weights` (1 / the item's task size): the weighted mean is then the
average of per-task accuracies, the paper's "average over tasks", and resampling items resamples every task.

A `Run` is one (method, seed) scored with one selection rule:
  {"method": str, "seed": int, "k_pre": int, "correct": {k: {item_id: 0/1}}, "pred": {k: {item_id: choice}}}
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from phds_jax.evaluation import metrics as M

Run = dict[str, Any]
Groups = dict[str, list[Run]]  # method -> its runs (one per seed)
_BLOCK = 200


def group(runs: Sequence[Run]) -> Groups:
  out: Groups = collections.defaultdict(list)
  for r in sorted(runs, key=lambda r: r["seed"]):
    out[r["method"]].append(r)
  return dict(out)


def common_ids(groups: Groups, ks: Sequence[int]) -> list[str]:
  """Items scored in every run at every k (normally all of them); the tables use only these."""
  sets = [set(r["correct"][k]) for runs in groups.values() for r in runs for k in ks if k in r["correct"]]
  if not sets:
    raise ValueError("no scored items")
  ids = sorted(set.intersection(*sets))
  if not ids:
    raise ValueError("the runs share no item ids")
  return ids


def matrix(runs: Sequence[Run], k: int, ids: Sequence[str], field: str = "correct") -> np.ndarray:
  """[seeds, items] of 0/1 correctness (or chosen answers with field='pred')."""
  return np.array([[r[field][k][i] for i in ids] for r in runs])


def agreement_matrix(runs_a: Sequence[Run], k_a: int, runs_b: Sequence[Run], k_b: int,
                     ids: Sequence[str]) -> np.ndarray:
  """[pairs, items] 1 where run a at k_a and run b at k_b chose the same answer; runs are paired by position
  (one checkpoint at two k: the same list twice; two oracles: seed i of one with seed i of the other)."""
  n = min(len(runs_a), len(runs_b))
  pa, pb = matrix(runs_a[:n], k_a, ids, "pred"), matrix(runs_b[:n], k_b, ids, "pred")
  return (pa == pb).astype(np.float64)


# ----------------------------------------------------------------------------------------------- bootstrap


def _seed_means(mat: np.ndarray, seed_idx: np.ndarray) -> np.ndarray:
  """[B, N]: per item, the mean over each resample's seeds."""
  return mat[seed_idx].mean(axis=1)


def weighted_mean(mat: np.ndarray, weights: np.ndarray | None) -> float:
  """Mean of a [seeds, items] matrix, items weighted (None: plain mean)."""
  mat = np.atleast_2d(np.asarray(mat, np.float64)).mean(axis=0)
  return float(mat.mean() if weights is None else np.sum(mat * weights) / np.sum(weights))


def hier_bootstrap(a: np.ndarray, b: np.ndarray | None = None, *, n_boot: int = M.N_BOOT,
                   confidence: float = 0.95, seed: int = 0, same_runs: bool = False,
                   weights: np.ndarray | None = None) -> dict[str, float]:
  """Mean of a [seeds, items] (or mean(a) - mean(b) on the same items) with a seeds-and-items bootstrap CI.

  Items are resampled once per replicate and shared by a and b (paired); seeds are resampled independently
  for a and b (different training runs), or jointly with `same_runs` (a and b are the same checkpoints at two
  k). With one seed this is the ordinary item bootstrap. `weights` [items] weight each item (see module doc);
  `lo90`/`hi90` are the 90% interval of the same replicates.
  """
  a = np.atleast_2d(np.asarray(a, np.float64))
  b = None if b is None else np.atleast_2d(np.asarray(b, np.float64))
  if b is not None and a.shape[1] != b.shape[1]:
    raise ValueError(f"paired results must share items, got {a.shape[1]} and {b.shape[1]}")
  if same_runs and (b is None or a.shape != b.shape):
    raise ValueError("same_runs needs a and b of the same [seeds, items] shape")
  n = a.shape[1]
  w = None if weights is None else np.asarray(weights, np.float64)
  if w is not None and w.shape != (n,):
    raise ValueError(f"weights must have one entry per item ({n}), got shape {w.shape}")
  point = weighted_mean(a, w) - (weighted_mean(b, w) if b is not None else 0.0)
  if n == 0:
    return dict(mean=math.nan, lo=math.nan, hi=math.nan, lo90=math.nan, hi90=math.nan, p_value=math.nan,
                n_seeds=0, n_items=0)
  rng = np.random.default_rng(seed)
  stats = []
  for start in range(0, n_boot, _BLOCK):
    size = min(_BLOCK, n_boot - start)
    items = rng.integers(0, n, size=(size, n))
    seeds_a = rng.integers(0, a.shape[0], (size, a.shape[0]))
    value = np.take_along_axis(_seed_means(a, seeds_a), items, 1)
    if b is not None:
      seeds_b = seeds_a if same_runs else rng.integers(0, b.shape[0], (size, b.shape[0]))
      value = value - np.take_along_axis(_seed_means(b, seeds_b), items, 1)
    if w is None:
      stats.append(value.mean(axis=1))
    else:
      wi = w[items]
      stats.append(np.sum(value * wi, axis=1) / np.sum(wi, axis=1))
  stats = np.concatenate(stats)
  tail = (1 - confidence) / 2 * 100
  lo, hi = np.percentile(stats, [tail, 100 - tail])
  lo90, hi90 = np.percentile(stats, [5, 95])
  p = min(1.0, 2 * min(float(np.mean(stats <= 0)), float(np.mean(stats >= 0))))
  return dict(mean=float(point), lo=float(lo), hi=float(hi), lo90=float(lo90), hi90=float(hi90), p_value=p,
              n_seeds=int(a.shape[0]) if b is None else int(min(a.shape[0], b.shape[0])), n_items=int(n))


# ------------------------------------------------------------------------------------------------- tables


def accuracy_table(groups: Groups, ks: Sequence[int], ids: Sequence[str], **boot) -> dict[str, dict[int, dict]]:
  """method -> k -> {mean, lo, hi, n_seeds, n_items, per_seed}."""
  out = {}
  for method, runs in groups.items():
    out[method] = {}
    for k in ks:
      mat = matrix(runs, k, ids)
      per_seed = [weighted_mean(row, boot.get("weights")) for row in mat]
      out[method][k] = dict(hier_bootstrap(mat, **boot), per_seed=per_seed)
  return out


def drop_table(acc: Mapping[str, Mapping[int, Mapping]], k_ref: Mapping[str, int]) -> dict[str, dict[int, float]]:
  """method -> k -> relative drop of mean accuracy vs that method's own k_pre, (acc@ref - acc@k)/acc@ref."""
  return {m: M.relative_drop({k: v["mean"] for k, v in by_k.items()}, k_ref[m]) for m, by_k in acc.items()}


def k_change_table(groups: Groups, ks: Sequence[int], ids: Sequence[str], k_ref: Mapping[str, int],
                   **boot) -> dict[str, dict[int, dict]]:
  """method -> k -> acc@k − acc@k_ref of the same checkpoints (seeds and items resampled jointly): is a drop
  when k is lowered beyond noise?"""
  out = {}
  for method, runs in groups.items():
    ref = matrix(runs, k_ref[method], ids)
    out[method] = {k: hier_bootstrap(matrix(runs, k, ids), ref, same_runs=True, **boot) for k in ks}
  return out


def well_specified(groups: Groups, k: int) -> str | None:
  """The method whose base was pretrained at k and fine-tuned at k (oracle / oracle_k{k}), if present."""
  for method, runs in groups.items():
    if method.startswith("oracle") and runs and runs[0]["k_pre"] == k:
      return method
  return None


def paired_table(groups: Groups, ks: Sequence[int], ids: Sequence[str], subjects: Sequence[str],
                 references: Sequence[str], **boot) -> list[dict]:
  """Rows {subject, reference, k, mean (difference), lo, hi, p_value} for subject − reference at each k.

  The reference 'oracle_ws' means the well-specified oracle at that k (Oracle-k@k), where one exists.
  """
  rows = []
  for subject in [s for s in subjects if s in groups]:
    for ref in references:
      for k in ks:
        name = well_specified(groups, k) if ref == "oracle_ws" else ref
        if name is None or name not in groups or name == subject:
          continue
        d = hier_bootstrap(matrix(groups[subject], k, ids), matrix(groups[name], k, ids), **boot)
        rows.append(dict(subject=subject, reference=ref if ref != "oracle_ws" else f"oracle_ws ({name})", k=k,
                         **d))
  return rows


def agreement_table(groups: Groups, pairs: Sequence[Sequence[int]], ids: Sequence[str], **boot) -> list[dict]:
  """Cross-k answer agreement (docs/method.md §4.2) for each pair (k1, k2).

  Rows: every method's own checkpoint at k1 vs k2 ("<method>@k1 vs @k2"), and, where oracles pretrained at
  both k exist, the pair of separate well-specified oracles ("Oracle-k1@k1 vs Oracle-k2@k2"). Each row holds
  the agreement with its CI, the difference to the oracle pair (absolute with CI, and relative = ratio − 1),
  and the difference to the controls' own single checkpoints (`vs_controls`: naive, base), which any single
  checkpoint evaluated at two k is compared against: agreeing with itself is not special to PHDS.
  """
  rows = []
  for k1, k2 in pairs:
    o1, o2 = well_specified(groups, k1), well_specified(groups, k2)
    oracle_pair = agreement_matrix(groups[o1], k1, groups[o2], k2, ids) if o1 and o2 else None
    if oracle_pair is not None:
      rows.append(dict(pair=[k1, k2], row=f"{o1}@{k1} vs {o2}@{k2}", kind="oracle_pair",
                       **hier_bootstrap(oracle_pair, **boot)))
    same_by = {}
    for method, runs in groups.items():
      if max(r["k_pre"] for r in runs) < k2:
        continue  # an oracle pretrained below k2 is not a k2 model
      same_by[method] = agreement_matrix(runs, k1, runs, k2, ids)
    for method, same in same_by.items():
      row = dict(pair=[k1, k2], row=f"{method}@{k1} vs @{k2}", kind="same_checkpoint", method=method,
                 **hier_bootstrap(same, **boot))
      if oracle_pair is not None:
        diff = hier_bootstrap(same, oracle_pair, **boot)
        rel = M.compare_agreements(row["mean"], weighted_mean(oracle_pair, boot.get("weights")))["relative"]
        row["vs_oracle_pair"] = dict(absolute=diff["mean"], lo=diff["lo"], hi=diff["hi"], lo90=diff["lo90"],
                                     hi90=diff["hi90"], p_value=diff["p_value"], relative=rel)
      row["vs_controls"] = {}
      for control in ("naive", "base"):
        if control in same_by and control != method:
          d = hier_bootstrap(same, same_by[control], **boot)
          row["vs_controls"][control] = {f: d[f] for f in ("mean", "lo", "hi", "lo90", "hi90", "p_value")}
      rows.append(row)
  return rows
