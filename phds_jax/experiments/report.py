"""The comparison's report: loads every run's scored items, builds the tables, writes report.json / report.md.

Tables are per test task and, for the multiple-choice tasks together, of the average over tasks (the paper's
headline number); perplexity tasks get a per-k table of their own. With an anchor sweep, `phds_curriculum`
is, per seed, the anchor run with the best validation score (the selection signal, never the test items).

Claims (docs/method.md §5-6) are tested as the field tests them, at an equivalence margin δ (`report.margin`,
absolute accuracy) stated in the report, and worded from the verdicts, whatever the numbers are:
  * "PHDS ≈ Oracle at k_pre": TOST, i.e. the 90% CI of PHDS − Oracle inside ±δ -> holds; the 95% CI below 0
    -> refuted; otherwise inconclusive (the CI is too wide to tell).
  * "PHDS ahead of X at k_pre/2 <= k < k_pre" (X = Naive, base, the misspecified Oracle): the 95% CI above 0
    -> holds; below 0, or the 90% CI inside ±δ (any gain is smaller than δ) -> refuted; else inconclusive.
  * Cross-k agreement: PHDS against the separate well-specified oracles, and against the single-checkpoint
    controls (Naive, base) evaluated at the same two k, with the same rules.
  * A cliff below k_pre/2: every relative drop at k < k_pre/2 exceeds twice the largest drop (at least 0.01)
    at k_pre/2 <= k < k_pre, and acc@k − acc@k_pre there has a CI below 0.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from phds_jax.evaluation import report as eval_report
from phds_jax.experiments import aggregate as agg

PHDS = ("phds_curriculum", "phds_uniform")
CURRICULUM = "phds_curriculum"
VERDICTS = ("holds", "refuted", "inconclusive", "not testable")


def load_run(workdir: str, result: dict[str, Any], rule: str) -> dict[str, Any]:
  """One run's per-item correctness and chosen answers at every k for every non-perplexity task (item ids
  prefixed 'task/'), and its perplexity per task and k, for the checkpoint `rule` selected."""
  eval_dir = os.path.join(workdir, result["eval_dirs"][rule])
  summary = eval_report.load_summary(eval_dir)
  ks = summary["meta"]["ks"]
  correct: dict[int, dict] = {k: {} for k in ks}
  pred: dict[int, dict] = {k: {} for k in ks}
  task_of, kinds, metrics, ppl = {}, {}, {}, {}
  for task, entry in summary["tasks"].items():
    kinds[task], metrics[task] = entry["kind"], entry["primary"]
    if entry["kind"] == "ppl":
      ppl[task] = {int(k): float(v[entry["primary"]]) for k, v in entry["by_k"].items()}
      continue
    for k in ks:
      records = eval_report.load_samples(eval_dir, task, k)
      for i, v in eval_report.correctness(records, entry["primary"]).items():
        correct[k][f"{task}/{i}"] = v
        task_of[f"{task}/{i}"] = task
      pred[k].update({f"{task}/{i}": v for i, v in eval_report.predictions(records).items()})
  return dict(method=result["method"], seed=result["seed"], k_pre=result["k_pre"], correct=correct, pred=pred,
              task_of=task_of, kinds=kinds, metrics=metrics, ppl=ppl,
              val_score=result.get("val_score", {}).get(rule), anchor=None)


def pick_anchors(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, int]]:
  """Adds `phds_curriculum`: per seed, the phds_curriculum_a{A} run with the best validation score (ties: the
  lower anchor). Returns the runs and seed -> chosen anchor ({} without a sweep)."""
  prefix = CURRICULUM + "_a"
  swept = [r for r in runs if r["method"].startswith(prefix)]
  chosen: dict[int, int] = {}
  out = list(runs)
  for seed in sorted({r["seed"] for r in swept}):
    cands = sorted((r for r in swept if r["seed"] == seed), key=lambda r: int(r["method"][len(prefix):]))
    best = max(cands, key=lambda r: -math.inf if r["val_score"] is None else r["val_score"])
    chosen[seed] = int(best["method"][len(prefix):])
    out.append(dict(best, method=CURRICULUM, anchor=chosen[seed]))
  return out, chosen


def _task_weights(task_of: dict[str, str], ids: list[str]) -> np.ndarray:
  counts: dict[str, int] = {}
  for i in ids:
    counts[task_of[i]] = counts.get(task_of[i], 0) + 1
  return np.array([1.0 / counts[task_of[i]] for i in ids])


def build(workdir: str, results: list[dict[str, Any]], *, rule: str, ks: list[int], k_pre: int,
          pairs: list[list[int]], n_boot: int, seed: int = 0, margin: float = 0.02) -> dict[str, Any]:
  """Every table for one selection rule (JSON-ready apart from int dict keys)."""
  runs, anchors = pick_anchors([load_run(workdir, r, rule) for r in results])
  groups = agg.group(runs)
  ids = agg.common_ids(groups, ks)
  first = runs[0]
  mc_tasks = [t for t, kind in first["kinds"].items() if kind == "mc"]
  avg_ids = [i for i in ids if first["task_of"][i] in mc_tasks]
  boot = dict(n_boot=n_boot, seed=seed, weights=_task_weights(first["task_of"], avg_ids))
  acc = agg.accuracy_table(groups, ks, avg_ids, **boot)
  k_ref = {m: min(rs[0]["k_pre"], max(ks)) for m, rs in groups.items()}
  refs = ["oracle_ws", "oracle", "naive", "base"]
  per_task = {}
  for task, kind in first["kinds"].items():
    if kind == "ppl":
      continue
    t_ids = [i for i in ids if first["task_of"][i] == task]
    t_acc = agg.accuracy_table(groups, ks, t_ids, n_boot=n_boot, seed=seed)
    per_task[task] = dict(kind=kind, metric=first["metrics"][task], n_items=len(t_ids), accuracy=t_acc,
                          relative_drop=agg.drop_table(t_acc, k_ref))
  return dict(
      rule=rule, task="average of " + ", ".join(mc_tasks) if len(mc_tasks) > 1 else mc_tasks[0],
      metric="mean of primary metrics" if len(mc_tasks) > 1 else first["metrics"][mc_tasks[0]],
      mc_tasks=mc_tasks, n_items=len(avg_ids), ks=ks, k_pre=k_pre, margin=margin, anchors=anchors,
      seeds={m: [r["seed"] for r in rs] for m, rs in groups.items()},
      selected_steps=_steps(results, rule), validation=_validation(results, rule),
      accuracy=acc, relative_drop=agg.drop_table(acc, k_ref), relative_drop_ref=k_ref,
      k_change=agg.k_change_table(groups, ks, avg_ids, k_ref, **boot), heldout_loss=heldout_table(results, rule, ks),
      per_task=per_task, perplexity=perplexity_table(groups, k_ref),
      paired=agg.paired_table(groups, ks, avg_ids, PHDS, refs, **boot),
      agreement=agg.agreement_table(groups, [tuple(p) for p in pairs], avg_ids, **boot))


def perplexity_table(groups: agg.Groups, k_ref: dict[str, int]) -> dict[str, dict[str, dict]]:
  """task -> method -> {k: mean over seeds, per_seed, relative_increase vs the method's k_pre}."""
  out: dict[str, dict[str, dict]] = {}
  for method, runs in groups.items():
    for task in runs[0]["ppl"]:
      by_k = {k: [r["ppl"][task][k] for r in runs] for k in runs[0]["ppl"][task]}
      mean = {k: float(np.mean(v)) for k, v in by_k.items()}
      ref = mean.get(k_ref[method])
      out.setdefault(task, {})[method] = dict(
          mean=mean, per_seed=by_k, ref_k=k_ref[method],
          relative_increase={k: (v / ref - 1.0) if ref else math.nan for k, v in mean.items()})
  return out


def heldout_table(results: list[dict[str, Any]], rule: str, ks: list[int]) -> dict[str, dict[int, dict]]:
  """method -> k -> held-out SFT loss (mean, per seed) of the selected checkpoints, from the trainer's log.

  A far less noisy view of how lowering k hurts than a few hundred test questions; k above a model's k_pre
  is absent (not logged).
  """
  out: dict[str, dict[int, dict]] = {}
  for r in results:
    vals = r.get("val_by_step", {}).get(str(r["steps"][rule]))
    if not vals:
      continue
    for k in ks:
      if str(k) in vals:
        out.setdefault(r["method"], {}).setdefault(k, dict(per_seed=[]))["per_seed"].append(vals[str(k)])
  for by_k in out.values():
    for v in by_k.values():
      v["mean"] = sum(v["per_seed"]) / len(v["per_seed"])
  return out


def _steps(results: list[dict[str, Any]], rule: str) -> dict[str, dict[int, int]]:
  out: dict[str, dict[int, int]] = {}
  for r in results:
    out.setdefault(r["method"], {})[r["seed"]] = r["steps"][rule]
  return out


def _validation(results: list[dict[str, Any]], rule: str) -> dict[str, dict[int, float]]:
  """method -> seed -> validation score of the selected step (accuracy, or minus the held-out loss)."""
  out: dict[str, dict[int, float]] = {}
  for r in results:
    if rule in r.get("val_score", {}):
      out.setdefault(r["method"], {})[r["seed"]] = r["val_score"][rule]
  return out


# ------------------------------------------------------------------------------------------------- claims


def equivalence(d: dict | None, margin: float) -> str:
  """TOST verdict for 'the difference is about zero': the 90% CI inside ±margin."""
  if d is None:
    return "not testable"
  if -margin < d["lo90"] and d["hi90"] < margin:
    return "holds"
  if d["hi"] < 0 or d["lo"] > 0:
    return "refuted"
  return "inconclusive"


def superiority(d: dict | None, margin: float) -> str:
  """Verdict for 'the difference is above zero'; an equivalence within ±margin refutes a gain worth having."""
  if d is None:
    return "not testable"
  if d["lo"] > 0:
    return "holds"
  if d["hi"] < 0 or (-margin < d["lo90"] and d["hi90"] < margin):
    return "refuted"
  return "inconclusive"


def combine(verdicts: list[str]) -> str:
  """All k must hold for a claim over a range; one refuted k refutes it; otherwise inconclusive."""
  v = [x for x in verdicts if x != "not testable"]
  if not v:
    return "not testable"
  if all(x == "holds" for x in v):
    return "holds"
  return "refuted" if "refuted" in v else "inconclusive"


_WORDS = {
    "equiv": {"holds": "equivalent within ±{m}", "refuted": "worse, outside the margin",
              "inconclusive": "neither shown equivalent within ±{m} nor different",
              "not testable": "not testable"},
    "ahead": {"holds": "ahead", "refuted": "not ahead (a gain, if any, is below {m} or negative)",
              "inconclusive": "undecided (the CI is wider than the margin)", "not testable": "not testable"},
}


def _claim(claim: str, verdict: str, evidence: str, kind: str, margin: float) -> dict[str, Any]:
  return dict(claim=claim, verdict=verdict, holds={"holds": True, "refuted": False}.get(verdict),
              wording=_WORDS[kind][verdict].format(m=f"{margin:g}"), evidence=evidence)


def claims(t: dict[str, Any]) -> list[dict[str, Any]]:
  """The paper's claims for each PHDS variant, each with a verdict, its wording and the evidence."""
  out, k_pre, ks, m = [], t["k_pre"], t["ks"], t.get("margin", 0.02)
  paired = {(r["subject"], r["reference"].split(" ")[0], r["k"]): r for r in t["paired"]}
  low_ks = [k for k in ks if k_pre / 2 <= k < k_pre]
  for phds in [p for p in PHDS if p in t["accuracy"]]:
    r = paired.get((phds, "oracle", k_pre))
    out.append(_claim(f"{phds} ≈ Oracle at k_pre={k_pre}", equivalence(r, m), _diff_text(r), "equiv", m))
    for ref, label in (("naive", "Naive"), ("base", "the base (no SFT)"), ("oracle", "the misspecified Oracle")):
      rows = [paired[(phds, ref, k)] for k in low_ks if (phds, ref, k) in paired]
      verdicts = [superiority(x, m) for x in rows]
      out.append(_claim(f"{phds} ahead of {label} at k_pre/2 <= k < k_pre", combine(verdicts),
                        "; ".join(f"k={x['k']}: {_diff_text(x)} -> {v}" for x, v in zip(rows, verdicts))
                        or f"{ref} not run", "ahead", m))
    agree = [a for a in t["agreement"] if a.get("method") == phds]
    with_oracles = [a for a in agree if "vs_oracle_pair" in a]
    v = [superiority(_as_diff(a["vs_oracle_pair"]), m) for a in with_oracles]
    out.append(_claim(f"{phds} cross-k agreement above separate well-specified oracles", combine(v),
                      "; ".join(f"{tuple(a['pair'])}: {_agree_text(a)} -> {x}" for a, x in zip(with_oracles, v))
                      or "no pair with oracles pretrained at both k", "ahead", m))
    for control in ("naive", "base"):
      rows = [(a, a["vs_controls"][control]) for a in agree if control in a.get("vs_controls", {})]
      v = [superiority(d, m) for _, d in rows]
      out.append(_claim(f"{phds} cross-k agreement above {control}'s single checkpoint at the same k", combine(v),
                        "; ".join(f"{tuple(a['pair'])}: {_diff_text(d)} -> {x}" for (a, d), x in zip(rows, v))
                        or f"{control} not run", "ahead", m))
    out.extend(_cliff(t, phds))
  return out


def _cliff(t: dict[str, Any], phds: str) -> list[dict[str, Any]]:
  k_pre, ks = t["k_pre"], t["ks"]
  drop, change = t["relative_drop"].get(phds, {}), t.get("k_change", {}).get(phds, {})
  half = k_pre / 2
  below = [k for k in ks if k < half]
  at = [k for k in ks if half <= k < k_pre]
  if not (below and at):
    return []
  steep = min(drop[k] for k in below) > 2 * max(max(drop[k] for k in at), 0.01)
  significant = all(change[k]["hi"] < 0 for k in below) if change else True
  verdict = "holds" if steep and significant else "refuted" if not steep else "inconclusive"
  evidence = ", ".join(f"drop@{k}={drop[k]:+.3f}" for k in sorted(below + at)) + (
      "; acc@k − acc@k_pre: " + ", ".join(f"k={k}: {_diff_text(change[k])}" for k in below) if change else "")
  return [dict(claim=f"{phds}: cliff below k_pre/2={half:g}", verdict=verdict,
               holds={"holds": True, "refuted": False}.get(verdict),
               wording={"holds": "a cliff", "refuted": "no cliff", "inconclusive": "steep but not significant"}[
                   verdict], evidence=evidence)]


def _as_diff(v: dict) -> dict:
  return dict(mean=v["absolute"], lo=v["lo"], hi=v["hi"], lo90=v["lo90"], hi90=v["hi90"], p_value=v["p_value"])


def _diff_text(r: dict | None) -> str:
  if r is None:
    return "not run"
  return f"{r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] (90%: [{r['lo90']:+.4f}, {r['hi90']:+.4f}], p={r['p_value']:.3f})"


def _agree_text(a: dict) -> str:
  v = a["vs_oracle_pair"]
  return f"{v['absolute']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}] abs, {100 * v['relative']:+.1f}% rel"


# ------------------------------------------------------------------------------------------------ writing


def _f(x: float | None, digits: int = 3) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
      "| " + " | ".join(r) + " |" for r in rows]


def markdown(report: dict[str, Any]) -> str:
  """report.md: one section per selection rule, the primary rule first."""
  meta = report["meta"]
  lines = ["# MoE-PHDS comparison", "",
           f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
           f"Wall time of the last invocation that ran anything ({meta['timed_at']}): "
           f"{meta['wall_seconds'] / 60:.1f} min (runs already done are reused); "
           f"process CPU time {meta['cpu_seconds'] / 60:.1f} min; 1-min load average "
           f"{meta['load_average']['start']:.1f} at the start, {meta['load_average']['end']:.1f} at the end  ",
           f"Sum over all runs (whenever they ran) of SFT time {meta['train_seconds'] / 60:.1f} min and of "
           f"scoring time {meta['eval_seconds'] / 60:.1f} min  ",
           f"Methods: {', '.join(meta['methods'])}; seeds {meta['seeds']}; {meta['num_steps']} SFT steps each.", "",
           "Accuracy: mean over seeds of the per-seed MC accuracy (several tasks: the mean of per-task accuracies); "
           "± is the half-width of the 95% percentile interval of a two-level bootstrap over training seeds and "
           "test items (see phds_jax/experiments/aggregate.py). The base has no seed, so its interval is over "
           "items only.", ""]
  primary = report["rules"][meta["primary_rule"]]
  lines += _rule_section(primary, primary=True)
  for rule, t in report["rules"].items():
    if rule == meta["primary_rule"]:
      continue
    if t["selected_steps"] == primary["selected_steps"]:
      lines += [f"## Checkpoint selection: `{rule}`", "",
                f"Every run selected the same step as under `{meta['primary_rule']}`: the tables are identical.", ""]
    else:
      lines += _rule_section(t, primary=False)
  lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in meta.get("plots", [])]
  return "\n".join(lines) + "\n"


def _rule_section(t: dict[str, Any], primary: bool) -> list[str]:
  ks = t["ks"]
  lines = [f"## Checkpoint selection: `{t['rule']}`" + (" (primary)" if primary else ""), "",
           f"Task `{t['task']}` ({t['metric']}, {t['n_items']} items). Equivalence margin δ = "
           f"{t.get('margin', 0.02):g} (absolute accuracy).", ""]
  if t.get("anchors"):
    lines += [f"Anchor chosen on validation per seed (phds_curriculum): {t['anchors']}", ""]
  lines += ["### Paper claims at this scale", ""]
  lines += [f"- **{c['verdict']}** — {c['claim']}: " + (f"{c['wording']}. " if c["verdict"] != "not testable" else "")
            + c["evidence"] for c in t["claims"]]
  lines += ["", "### Accuracy by k" + (" (average over the MC tasks)" if len(t.get("mc_tasks", [])) > 1 else ""), ""]
  rows = [[m] + [f"{_f(v[k]['mean'])} ± {_f((v[k]['hi'] - v[k]['lo']) / 2)}" for k in ks]
          for m, v in t["accuracy"].items()]
  lines += _table(["method"] + [f"k={k}" for k in ks], rows)
  if len(t.get("per_task", {})) > 1 or any(v["kind"] != "mc" for v in t.get("per_task", {}).values()):
    for task, v in t["per_task"].items():
      lines += ["", f"#### `{task}` ({v['kind']}, {v['metric']}, {v['n_items']} items)", ""]
      rows = [[m] + [f"{_f(a[k]['mean'])} ± {_f((a[k]['hi'] - a[k]['lo']) / 2)}" for k in ks]
              for m, a in v["accuracy"].items()]
      lines += _table(["method"] + [f"k={k}" for k in ks], rows)
  for task, by_m in t.get("perplexity", {}).items():
    lines += ["", f"### `{task}` perplexity by k (mean over seeds; relative increase vs the method's k_pre)", ""]
    rows = [[m] + [f"{v['mean'][k]:.2f} ({100 * v['relative_increase'][k]:+.1f}%)" if k in v["mean"] else "–"
                   for k in ks] for m, v in by_m.items()]
    lines += _table(["method"] + [f"k={k}" for k in ks], rows)
  lines += ["", "### Relative drop vs the method's own k_pre, (acc@k_pre − acc@k)/acc@k_pre", ""]
  rows = [[m, str(t["relative_drop_ref"][m])] + [f"{v[k]:+.3f}" if k in v else "–" for k in ks]
          for m, v in t["relative_drop"].items()]
  lines += _table(["method", "ref k"] + [f"k={k}" for k in ks], rows)
  if t.get("k_change"):
    lines += ["", "### acc@k − acc@k_pre of the same checkpoints, 95% CI (seeds and items resampled jointly)", ""]
    rows = [[m, str(t["relative_drop_ref"][m])] + [
        "–" if k == t["relative_drop_ref"][m] else f"{v[k]['mean']:+.3f} [{v[k]['lo']:+.3f}, {v[k]['hi']:+.3f}]"
        for k in ks] for m, v in t["k_change"].items()]
    lines += _table(["method", "ref k"] + [f"k={k}" for k in ks], rows)
  if t.get("heldout_loss"):
    lines += ["", "### Held-out SFT loss of the selected checkpoints (validation split; mean [min, max] over "
              "seeds)", ""]
    rows = [[m] + [f"{v[k]['mean']:.3f} [{min(v[k]['per_seed']):.3f}, {max(v[k]['per_seed']):.3f}]" if k in v
                   else "–" for k in ks] for m, v in t["heldout_loss"].items()]
    lines += _table(["method"] + [f"k={k}" for k in ks], rows)
  lines += ["", "### Paired differences (PHDS − reference), 95% and 90% CI over seeds × items", ""]
  rows = [[r["subject"], r["reference"], str(r["k"]), f"{r['mean']:+.4f}", f"[{r['lo']:+.4f}, {r['hi']:+.4f}]",
           f"[{r['lo90']:+.4f}, {r['hi90']:+.4f}]", f"{r['p_value']:.3f}"] for r in t["paired"]]
  lines += _table(["PHDS", "reference", "k", "diff", "95% CI", "90% CI", "p"], rows)
  lines += ["", "### Cross-k agreement (share of items with the same chosen answer)", ""]
  rows = []
  for a in t["agreement"]:
    v = a.get("vs_oracle_pair")
    rows.append([str(tuple(a["pair"])), a["row"], f"{_f(a['mean'])} [{_f(a['lo'])}, {_f(a['hi'])}]",
                 "–" if v is None else f"{v['absolute']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]",
                 "–" if v is None else f"{100 * v['relative']:+.1f}%"])
  lines += _table(["pair", "row", "agreement", "vs oracle pair (abs)", "relative"], rows)
  ctrl = [(a, c, d) for a in t["agreement"] for c, d in a.get("vs_controls", {}).items()
          if a.get("method") in PHDS]
  if ctrl:
    lines += ["", "### Cross-k agreement of PHDS minus that of a control's own checkpoint (95% CI)", ""]
    lines += _table(["pair", "PHDS", "control", "difference"],
                    [[str(tuple(a["pair"])), a["method"], c, f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"]
                     for a, c, d in ctrl])
  lines += ["", "### Selected steps and their validation score (per seed)", ""]
  val = t.get("validation", {})
  lines += [f"- {m}: steps {s}" + (f", validation {({k: round(v, 4) for k, v in val[m].items()})}" if m in val else "")
            for m, s in t["selected_steps"].items()]
  return lines + [""]


def write(workdir: str, report: dict[str, Any]) -> None:
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(_jsonable(report), f, indent=1, allow_nan=False)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(markdown(report))


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x
