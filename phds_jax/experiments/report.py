"""The comparison's report: loads every run's scored items, builds the tables, writes report.json / report.md.

The claims checked (docs/method.md §5-6) are stated mechanically from the intervals, so the markdown says
the same thing whatever the numbers are:
  1. PHDS ≈ Oracle at k_pre: the paired 95% CI of PHDS − Oracle at k_pre contains 0 (or lies above it).
  2. PHDS ahead of Naive and of the base at k_pre/2 <= k < k_pre: the paired CI lies above 0 at each such k.
  3. PHDS's cross-k agreement above that of separate well-specified oracles: the CI of the difference > 0.
  4. A cliff below k_pre/2: every relative drop at k < k_pre/2 exceeds twice the largest drop (at least 0.01)
     at k_pre/2 <= k < k_pre, and acc@k − acc@k_pre there has a CI below 0.
The agreement claim's evidence also lists the non-PHDS single checkpoints' agreement on the same pair: one
checkpoint at two k agrees with itself more than two separately trained models do whatever its SFT.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from phds_jax.evaluation import report as eval_report
from phds_jax.experiments import aggregate as agg

PHDS = ("phds_curriculum", "phds_uniform")


def load_run(workdir: str, result: dict[str, Any], rule: str) -> agg.Run:
  """One run's per-item correctness and chosen answers at every k, for the checkpoint `rule` selected."""
  eval_dir = os.path.join(workdir, result["eval_dirs"][rule])
  summary = eval_report.load_summary(eval_dir)
  ((task, entry),) = summary["tasks"].items()
  correct, pred = {}, {}
  for k in summary["meta"]["ks"]:
    records = eval_report.load_samples(eval_dir, task, k)
    correct[k] = eval_report.correctness(records, entry["primary"])
    pred[k] = eval_report.predictions(records)
  return dict(method=result["method"], seed=result["seed"], k_pre=result["k_pre"], correct=correct, pred=pred,
              task=task, metric=entry["primary"])


def build(workdir: str, results: list[dict[str, Any]], *, rule: str, ks: list[int], k_pre: int,
          pairs: list[list[int]], n_boot: int, seed: int = 0) -> dict[str, Any]:
  """Every table for one selection rule (JSON-ready apart from int dict keys)."""
  runs = [load_run(workdir, r, rule) for r in results]
  groups = agg.group(runs)
  ids = agg.common_ids(groups, ks)
  boot = dict(n_boot=n_boot, seed=seed)
  acc = agg.accuracy_table(groups, ks, ids, **boot)
  k_ref = {m: min(rs[0]["k_pre"], max(ks)) for m, rs in groups.items()}
  refs = ["oracle_ws", "oracle", "naive", "base"]
  return dict(
      rule=rule, task=runs[0]["task"], metric=runs[0]["metric"], n_items=len(ids), ks=ks, k_pre=k_pre,
      seeds={m: [r["seed"] for r in rs] for m, rs in groups.items()},
      selected_steps=_steps(results, rule),
      accuracy=acc, relative_drop=agg.drop_table(acc, k_ref), relative_drop_ref=k_ref,
      k_change=agg.k_change_table(groups, ks, ids, k_ref, **boot), heldout_loss=heldout_table(results, rule, ks),
      paired=agg.paired_table(groups, ks, ids, PHDS, refs, **boot),
      agreement=agg.agreement_table(groups, [tuple(p) for p in pairs], ids, **boot))


def heldout_table(results: list[dict[str, Any]], rule: str, ks: list[int]) -> dict[str, dict[int, dict]]:
  """method -> k -> held-out SFT loss (mean, per seed) of the selected checkpoints, from the trainer's log.

  It is the selection signal (validation split, not the MC test items), but a far less noisy view of how
  lowering k hurts than 295 four-way questions; k above a model's k_pre is absent (not logged).
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


# ------------------------------------------------------------------------------------------------- claims


def claims(t: dict[str, Any]) -> list[dict[str, Any]]:
  """The four paper claims, each with holds: True / False / None (not testable here) and the evidence."""
  out, k_pre, ks = [], t["k_pre"], t["ks"]
  paired = {(r["subject"], r["reference"].split(" ")[0], r["k"]): r for r in t["paired"]}
  for phds in [p for p in PHDS if p in t["accuracy"]]:
    r = paired.get((phds, "oracle", k_pre))
    out.append(dict(claim=f"{phds} ≈ Oracle at k_pre={k_pre}", holds=None if r is None else r["hi"] >= 0,
                    evidence=_diff_text(r)))
    for ref in ("naive", "base"):
      low = [paired[(phds, ref, k)] for k in ks if k_pre / 2 <= k < k_pre and (phds, ref, k) in paired]
      wins = [r for r in low if r["lo"] > 0]
      out.append(dict(claim=f"{phds} ahead of {ref} at k_pre/2 <= k < k_pre",
                      holds=None if not low else len(wins) == len(low),
                      evidence="; ".join(f"k={r['k']}: {_diff_text(r)}" for r in low) or f"{ref} not run"))
    agree = [a for a in t["agreement"] if a.get("method") == phds and "vs_oracle_pair" in a]
    out.append(dict(claim=f"{phds} cross-k agreement above separate oracles",
                    holds=None if not agree else all(a["vs_oracle_pair"]["lo"] > 0 for a in agree),
                    evidence="; ".join(f"{tuple(a['pair'])}: {_agree_text(a)}{_baselines(t, a)}" for a in agree)
                    or "no pair with oracles pretrained at both k"))
    drop, change = t["relative_drop"].get(phds, {}), t.get("k_change", {}).get(phds, {})
    half = k_pre / 2
    below = [k for k in ks if k < half]
    at = [k for k in ks if half <= k < k_pre]
    if below and at:
      worst_above = max(drop[k] for k in at)
      steep = min(drop[k] for k in below) > 2 * max(worst_above, 0.01)
      significant = all(change[k]["hi"] < 0 for k in below) if change else True
      out.append(dict(claim=f"{phds}: cliff below k_pre/2={half:g}", holds=steep and significant,
                      evidence=", ".join(f"drop@{k}={drop[k]:+.3f}" for k in sorted(below + at)) + (
                          "; acc@k − acc@k_pre: " + ", ".join(f"k={k}: {_diff_text(change[k])}" for k in below)
                          if change else "")))
  return out


def _baselines(t: dict[str, Any], a: dict) -> str:
  """The same pair's agreement for the non-PHDS single checkpoints: is PHDS special, or is any one model?"""
  others = [r for r in t["agreement"] if r["pair"] == a["pair"] and r.get("kind") == "same_checkpoint"
            and r["method"] in ("naive", "oracle", "base")]
  return " (one checkpoint at both k: " + ", ".join(f"{r['method']} {r['mean']:.3f}" for r in others) + ")" \
      if others else ""


def _diff_text(r: dict | None) -> str:
  if r is None:
    return "not run"
  return f"{r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] (p={r['p_value']:.3f})"


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
           "Accuracy: mean over seeds of the per-seed MC accuracy; ± is the half-width of the 95% percentile "
           "interval of a two-level bootstrap over training seeds and test items (see phds_jax/experiments/aggregate.py). The base has "
           "no seed, so its interval is over items only.", ""]
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
           f"Task `{t['task']}` ({t['metric']}, {t['n_items']} items).", "", "### Accuracy by k", ""]
  rows = [[m] + [f"{_f(v[k]['mean'])} ± {_f((v[k]['hi'] - v[k]['lo']) / 2)}" for k in ks]
          for m, v in t["accuracy"].items()]
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
  lines += ["", "### Paired differences (PHDS − reference), 95% CI over seeds × items", ""]
  rows = [[r["subject"], r["reference"], str(r["k"]), f"{r['mean']:+.4f}", f"[{r['lo']:+.4f}, {r['hi']:+.4f}]",
           f"{r['p_value']:.3f}"] for r in t["paired"]]
  lines += _table(["PHDS", "reference", "k", "diff", "95% CI", "p"], rows)
  lines += ["", "### Cross-k agreement (share of items with the same chosen answer)", ""]
  rows = []
  for a in t["agreement"]:
    v = a.get("vs_oracle_pair")
    rows.append([str(tuple(a["pair"])), a["row"], f"{_f(a['mean'])} [{_f(a['lo'])}, {_f(a['hi'])}]",
                 "–" if v is None else f"{v['absolute']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]",
                 "–" if v is None else f"{100 * v['relative']:+.1f}%"])
  lines += _table(["pair", "row", "agreement", "vs oracle pair (abs)", "relative"], rows)
  lines += ["", "### Selected steps (per seed)", ""]
  lines += [f"- {m}: {s}" for m, s in t["selected_steps"].items()]
  lines += ["", "### Paper claims at this scale", ""]
  lines += [f"- **{'holds' if c['holds'] else 'does not hold' if c['holds'] is False else 'not testable'}** "
            f"— {c['claim']}: {c['evidence']}" for c in t["claims"]]
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
