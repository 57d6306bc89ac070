"""The comparison driver: checkpoint selection, table/agreement assembly, config checks, and a smoke run."""

import json
import os

import jax
import numpy as np
import pytest

from configs import compare_demo, demo
from phds_jax import checkpoint as params_ckpt
from phds_jax import hf, models, paths
from phds_jax.experiments import aggregate as agg
from phds_jax.experiments import compare
from phds_jax.experiments import config as cfg_lib
from phds_jax.experiments import report, runs, selection
from phds_jax.training import protocol
from phds_jax.training.loop import train_and_evaluate

ASSETS = paths.ASSETS_DIR


# ----------------------------------------------------------------------------------------------- selection


def _records(losses_by_step):
  return [dict(step=s, loss=1.0, **{f"val_loss_k{k}": v for k, v in d.items()}, val_loss=0.0)
          for s, d in losses_by_step.items()] + [dict(step=999, loss=1.0)]  # a step without eval


VALS = {  # step -> k -> held-out loss; k_pre = 4
    10: {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.10},  # best at k_pre, but inside the burn-in
    20: {1: 5.0, 2: 4.0, 3: 3.0, 4: 0.50},  # best at k_pre after the burn-in, poor at low k
    30: {1: 2.0, 2: 1.0, 3: 1.0, 4: 0.90},  # best mean over {2, 3, 4}
    40: {1: 2.0, 2: 2.0, 3: 2.0, 4: 0.95},
}


def test_val_by_step_reads_only_evaluated_steps():
  vals = selection.val_by_step(_records(VALS))
  assert vals == VALS


def test_burn_in_then_best_at_kpre_vs_mean_over_k():
  kw = dict(k_pre=4, ks=(2, 3, 4), burn_in_steps=12)
  assert selection.select_step(VALS, "best_at_kpre", **kw) == 20
  assert selection.select_step(VALS, "mean_over_k", **kw) == 30
  assert selection.select_step(VALS, "best_at_kpre", **dict(kw, burn_in_steps=0)) == 10
  assert selection.select_all(VALS, cfg_lib.RULES, **kw) == {"best_at_kpre": 20, "mean_over_k": 30}


def test_selection_by_validation_accuracy_maximises():
  """The paper's signal: MC accuracy on validation items (select_acc_k{k}), higher is better."""
  acc = {10: {2: 0.9, 4: 0.9}, 20: {2: 0.30, 4: 0.60}, 30: {2: 0.50, 4: 0.55}}
  records = [dict(step=s, **{f"select_acc_k{k}": v for k, v in d.items()}, val_loss_k4=1.0) for s, d in acc.items()]
  vals = selection.val_by_step(records, "mc")
  assert vals == acc and selection.val_by_step(records, "loss") == {s: {4: 1.0} for s in acc}
  kw = dict(k_pre=4, ks=(2, 4), burn_in_steps=10, signal="mc")
  assert selection.select_step(vals, "best_at_kpre", **kw) == 20  # step 10 is inside the burn-in
  assert selection.select_step(vals, "mean_over_k", **kw) == 30
  assert selection.select_step(vals, "best_at_kpre", **dict(kw, signal="loss")) == 30  # read as a loss: lowest


def test_selection_edge_cases():
  kw = dict(k_pre=4, ks=(2, 3, 4))
  assert selection.select_step(VALS, "best_at_kpre", burn_in_steps=40, **kw) == 40  # none left: the last step
  assert selection.select_step(VALS, "best_at_kpre", burn_in_steps=12, available=[30, 40], **kw) == 30
  nan = {20: {4: float("nan")}, 30: {4: 2.0}}
  assert selection.select_step(nan, "best_at_kpre", k_pre=4, ks=(4,), burn_in_steps=0) == 30
  tie = {20: {2: 1.0}, 30: {2: 1.0}}
  assert selection.select_step(tie, "best_at_kpre", k_pre=2, ks=(2, 3, 4), burn_in_steps=0) == 20
  with pytest.raises(ValueError, match="unknown selection rule"):
    selection.select_step(VALS, "best_at_k1", burn_in_steps=0, **kw)
  with pytest.raises(ValueError, match="no evaluated steps"):
    selection.candidates([], 10)


# ------------------------------------------------------------------------------------------------- tables


def _run(method, seed, k_pre, correct, pred=None):
  """A synthetic Run: correct[k] and pred[k] are lists over items i0, i1, ..."""
  ids = [f"i{j}" for j in range(len(next(iter(correct.values()))))]
  pred = pred or {k: [1 - c for c in v] for k, v in correct.items()}
  return dict(method=method, seed=seed, k_pre=k_pre, correct={k: dict(zip(ids, v)) for k, v in correct.items()},
              pred={k: dict(zip(ids, v)) for k, v in pred.items()})


def _groups():
  ones, zeros, half = [1] * 8, [0] * 8, [1, 0] * 4
  runs = [_run("phds", s, 4, {2: ones, 4: ones}, {2: [0] * 8, 4: [0] * 8}) for s in (0, 1)]
  runs += [_run("oracle", s, 4, {2: zeros, 4: ones}, {2: [1] * 8, 4: [0] * 8}) for s in (0, 1)]
  runs += [_run("oracle_k2", s, 2, {2: half, 4: half}, {2: [0, 1] * 4, 4: [0, 1] * 4}) for s in (0, 1)]
  runs += [_run("base", 0, 4, {2: zeros, 4: half})]
  return agg.group(runs)


def test_accuracy_table_and_relative_drop():
  groups = _groups()
  ids = agg.common_ids(groups, [2, 4])
  acc = agg.accuracy_table(groups, [2, 4], ids, n_boot=200)
  assert acc["phds"][2]["mean"] == 1.0 and acc["oracle"][2]["mean"] == 0.0
  assert acc["base"][4]["mean"] == 0.5 and acc["base"][4]["lo"] < 0.5 < acc["base"][4]["hi"]
  assert acc["phds"][2]["per_seed"] == [1.0, 1.0] and acc["base"][4]["n_seeds"] == 1
  drop = agg.drop_table(acc, {"phds": 4, "oracle": 4, "oracle_k2": 2, "base": 4})
  assert drop["oracle"][2] == 1.0 and drop["phds"][2] == 0.0 and drop["oracle_k2"][4] == 0.0


def test_common_ids_drops_items_missing_anywhere():
  groups = _groups()
  del groups["base"][0]["correct"][4]["i3"]
  assert "i3" not in agg.common_ids(groups, [2, 4]) and len(agg.common_ids(groups, [2, 4])) == 7


def test_hier_bootstrap_seed_spread_widens_interval():
  rng = np.random.default_rng(0)
  items = rng.integers(0, 2, 200).astype(float)
  same = agg.hier_bootstrap(np.stack([items, items, items]), n_boot=400)
  shifted = agg.hier_bootstrap(np.stack([items, np.ones(200), np.zeros(200)]), n_boot=400)
  assert same["lo"] < same["mean"] < same["hi"]
  assert shifted["hi"] - shifted["lo"] > same["hi"] - same["lo"]
  paired = agg.hier_bootstrap(np.ones((2, 50)), np.zeros((3, 50)), n_boot=100)
  assert paired["mean"] == paired["lo"] == paired["hi"] == 1.0 and paired["p_value"] == 0.0
  with pytest.raises(ValueError, match="share items"):
    agg.hier_bootstrap(np.ones((1, 3)), np.ones((1, 4)))


def test_task_weights_average_per_task_accuracies():
  """Two tasks of 2 and 8 items: the weighted mean is the mean of the two task accuracies, not the pooled one."""
  a = np.array([[1, 1] + [0] * 8], float)  # task A (2 items) all right, task B (8 items) all wrong
  w = np.array([1 / 2] * 2 + [1 / 8] * 8)
  out = agg.hier_bootstrap(a, weights=w, n_boot=300)
  assert out["mean"] == pytest.approx(0.5) and agg.weighted_mean(a, None) == pytest.approx(0.2)
  assert out["lo"] <= out["lo90"] <= out["mean"] <= out["hi90"] <= out["hi"]
  with pytest.raises(ValueError, match="one entry per item"):
    agg.hier_bootstrap(a, weights=w[:3])


def test_equivalence_and_superiority_verdicts():
  d = lambda lo, hi, lo90, hi90: dict(mean=(lo + hi) / 2, lo=lo, hi=hi, lo90=lo90, hi90=hi90, p_value=0.5)
  assert report.equivalence(d(-0.025, 0.015, -0.015, 0.012), 0.02) == "holds"  # 90% CI inside ±δ
  assert report.equivalence(d(-0.05, 0.01, -0.04, 0.005), 0.02) == "inconclusive"  # a CI touching 0 is not ≈
  assert report.equivalence(d(-0.08, -0.03, -0.07, -0.04), 0.02) == "refuted"
  assert report.equivalence(None, 0.02) == "not testable"
  assert report.superiority(d(0.01, 0.05, 0.015, 0.045), 0.02) == "holds"
  assert report.superiority(d(-0.012, 0.012, -0.01, 0.01), 0.02) == "refuted"  # any gain is below δ
  assert report.superiority(d(-0.02, 0.06, -0.01, 0.05), 0.02) == "inconclusive"
  assert report.superiority(d(-0.06, -0.01, -0.05, -0.02), 0.02) == "refuted"
  assert report.combine(["holds", "holds"]) == "holds" and report.combine(["holds", "refuted"]) == "refuted"
  assert report.combine(["holds", "inconclusive"]) == "inconclusive" and report.combine([]) == "not testable"


def test_anchor_sweep_picks_per_seed_on_validation():
  runs = [dict(method=f"phds_curriculum_a{a}", seed=s, val_score=v) for a, s, v in
          ((2, 0, 0.40), (3, 0, 0.45), (2, 1, 0.50), (3, 1, 0.50), (2, 2, None), (3, 2, 0.1))]
  out, chosen = report.pick_anchors(runs + [dict(method="naive", seed=0, val_score=0.9)])
  assert chosen == {0: 3, 1: 2, 2: 3}  # a tie keeps the lower anchor; a missing score never wins
  picked = [r for r in out if r["method"] == "phds_curriculum"]
  assert [(r["seed"], r["anchor"]) for r in picked] == [(0, 3), (1, 2), (2, 3)]
  assert report.pick_anchors([dict(method="naive", seed=0, val_score=1.0)])[1] == {}


def test_paired_table_uses_the_well_specified_oracle():
  groups = _groups()
  ids = agg.common_ids(groups, [2, 4])
  rows = agg.paired_table(groups, [2, 4], ids, ["phds"], ["oracle_ws", "oracle", "naive"], n_boot=100)
  by = {(r["reference"], r["k"]): r for r in rows}
  assert by[("oracle_ws (oracle_k2)", 2)]["mean"] == 0.5  # PHDS@2 vs Oracle-2@2
  assert by[("oracle_ws (oracle)", 4)]["mean"] == 0.0
  assert by[("oracle", 2)]["mean"] == 1.0 and by[("oracle", 2)]["lo"] == 1.0
  assert not any(r["reference"] == "naive" for r in rows)  # absent methods are skipped


def test_agreement_table_against_separate_oracles():
  groups = _groups()
  ids = agg.common_ids(groups, [2, 4])
  rows = agg.agreement_table(groups, [(2, 4)], ids, n_boot=100)
  by = {r["row"]: r for r in rows}
  oracle_pair = by["oracle_k2@2 vs oracle@4"]  # preds [0,1,0,1..] vs [0]*8: half agree
  assert oracle_pair["kind"] == "oracle_pair" and oracle_pair["mean"] == 0.5
  phds = by["phds@2 vs @4"]
  assert phds["mean"] == 1.0
  assert phds["vs_oracle_pair"]["absolute"] == 0.5 and phds["vs_oracle_pair"]["relative"] == 1.0
  assert phds["vs_controls"]["base"]["mean"] == 0.5  # base agrees with itself on half the items
  assert by["oracle@2 vs @4"]["mean"] == 0.0
  assert not any(r["row"].startswith("oracle_k2@2 vs @4") for r in rows)  # a k=2 model has no k=4 point


def test_claims_are_stated_from_the_intervals():
  d = lambda subject, ref, k, lo, hi, lo90, hi90: dict(subject=subject, reference=ref, k=k, mean=(lo + hi) / 2,
                                                       lo=lo, hi=hi, lo90=lo90, hi90=hi90, p_value=0.5)
  ctrl = dict(mean=0.0, lo=-0.01, hi=0.01, lo90=-0.008, hi90=0.008, p_value=1.0)
  t = dict(k_pre=4, ks=[1, 2, 3, 4], margin=0.02,
           accuracy={"phds_curriculum": {}},
           paired=[d("phds_curriculum", "oracle", 4, -0.03, 0.01, -0.015, 0.005),
                   d("phds_curriculum", "naive", 2, 0.01, 0.09, 0.02, 0.08),
                   d("phds_curriculum", "naive", 3, -0.01, 0.01, -0.008, 0.008),
                   d("phds_curriculum", "oracle", 2, 0.01, 0.05, 0.015, 0.045),
                   d("phds_curriculum", "oracle", 3, 0.005, 0.04, 0.01, 0.035)],
           agreement=[dict(pair=[2, 4], method="phds_curriculum", vs_controls={"naive": ctrl},
                           vs_oracle_pair=dict(absolute=0.1, lo=0.05, hi=0.15, lo90=0.06, hi90=0.14, p_value=0.0,
                                               relative=0.2))],
           relative_drop={"phds_curriculum": {1: 0.4, 2: 0.05, 3: 0.01, 4: 0.0}})
  out = {c["claim"]: c for c in report.claims(t)}
  verdict = {name: c["verdict"] for name, c in out.items()}
  assert verdict["phds_curriculum ≈ Oracle at k_pre=4"] == "holds"
  assert "equivalent within ±0.02" in out["phds_curriculum ≈ Oracle at k_pre=4"]["wording"]
  assert verdict["phds_curriculum ahead of Naive at k_pre/2 <= k < k_pre"] == "refuted"  # equivalent at k=3
  assert verdict["phds_curriculum ahead of the base (no SFT) at k_pre/2 <= k < k_pre"] == "not testable"
  assert verdict["phds_curriculum ahead of the misspecified Oracle at k_pre/2 <= k < k_pre"] == "holds"
  assert verdict["phds_curriculum cross-k agreement above separate well-specified oracles"] == "holds"
  # ... but no more than Naive's own checkpoint agrees with itself: the control refutes the special claim.
  assert verdict["phds_curriculum cross-k agreement above naive's single checkpoint at the same k"] == "refuted"
  assert verdict["phds_curriculum: cliff below k_pre/2=2"] == "holds"
  t["paired"][0] = d("phds_curriculum", "oracle", 4, -0.04, 0.01, -0.035, 0.005)  # CI touches 0 but is wide
  assert {c["claim"]: c["verdict"] for c in report.claims(t)}["phds_curriculum ≈ Oracle at k_pre=4"] == \
      "inconclusive"
  t["k_change"] = {"phds_curriculum": {1: dict(mean=-0.1, lo=-0.2, hi=0.01, lo90=-0.18, hi90=-0.01,
                                                p_value=0.07)}}  # steep, but within noise
  verdict = {c["claim"]: c["verdict"] for c in report.claims(t)}
  assert verdict["phds_curriculum: cliff below k_pre/2=2"] == "inconclusive"


def test_k_change_pairs_the_same_checkpoints():
  groups = _groups()
  ids = agg.common_ids(groups, [2, 4])
  change = agg.k_change_table(groups, [2, 4], ids, {"phds": 4, "oracle": 4, "oracle_k2": 2, "base": 4},
                              n_boot=100)
  assert change["oracle"][2]["mean"] == -1.0 and change["oracle"][2]["hi"] == -1.0
  assert change["phds"][4]["mean"] == 0.0 and change["oracle_k2"][4]["lo"] == change["oracle_k2"][4]["hi"] == 0.0
  # Seeds that differ a lot but move together across k: joint resampling sees no spread in the difference.
  a = np.stack([np.ones(20), np.zeros(20)])
  joint = agg.hier_bootstrap(a, a, same_runs=True, n_boot=100)
  apart = agg.hier_bootstrap(a, a, n_boot=100)
  assert joint["lo"] == joint["hi"] == 0.0 and apart["hi"] - apart["lo"] > 0.5


# ------------------------------------------------------------------------------------------------- config


def _fake_base(path, k):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"num_experts_per_tok": k, "model_type": "olmoe"}, f)
  return str(path)


@pytest.fixture
def cfg(tmp_path):
  c = compare_demo.get_config()
  c.base = _fake_base(tmp_path / "b4", 4)
  c.oracle_bases = (_fake_base(tmp_path / "b2", 2),)
  return c


@pytest.mark.parametrize("change, match", [
    (dict(methods=("base", "phds")), r"methods \['phds'\] are unknown"),
    (dict(methods=()), "methods is empty"),
    (dict(seeds=()), "seeds is empty"),
    (dict(seeds=(0, 0)), "repeats"),
    (dict(k_train=(2, 5)), r"not a subset of \[1, k_pre=4\]"),
    (dict(k_train=(0, 2)), "not a subset"),
    (dict(k_train=()), "k_train is empty"),
    (dict(naive_k=6), "naive_k=6"),
    (dict(anchors=(2, 1)), "anchor 1 is outside"),
    (dict(methods=("base", "naive"), report=dict(pairs=(), margin=0.0, n_boot=10, seed=0)), "margin"),
    (dict(oracle_bases=()), "oracle_bases is empty"),
    (dict(base="/nonexistent"), "no config.json"),
])
def test_config_errors(cfg, change, match):
  cfg.update(change)
  with pytest.raises(cfg_lib.ComparisonConfigError, match=match):
    cfg_lib.validate(cfg)


def test_config_errors_nested(cfg, tmp_path):
  cfg.oracle_bases = (_fake_base(tmp_path / "b8", 8),)
  with pytest.raises(cfg_lib.ComparisonConfigError, match="must be in"):
    cfg_lib.validate(cfg)
  cfg.oracle_bases = ()
  cfg.methods = ("base", "naive")
  cfg.report.pairs = ((4, 2),)
  with pytest.raises(cfg_lib.ComparisonConfigError, match="agreement pair"):
    cfg_lib.validate(cfg)
  cfg.report.pairs = ()
  cfg.select.burn_in_steps = -1
  with pytest.raises(cfg_lib.ComparisonConfigError, match="burn_in_steps"):
    cfg_lib.validate(cfg)
  cfg.select.burn_in_steps, cfg.select.signal, cfg.select.task = 0, "mc", ""
  with pytest.raises(cfg_lib.ComparisonConfigError, match="needs select.task"):
    cfg_lib.validate(cfg)
  cfg.select.task, cfg.eval.tasks = "jsonl:x.jsonl", ("ppl:x.txt",)
  with pytest.raises(cfg_lib.ComparisonConfigError, match="only perplexity"):
    cfg_lib.validate(cfg)


def test_methods_share_the_recipe_and_differ_in_schedule(cfg):
  k_pre = cfg_lib.validate(cfg)
  ms = {m.name: m for m in cfg_lib.methods(cfg, k_pre)}
  assert list(ms) == ["base", "naive", "oracle", "oracle_k2", "phds_uniform", "phds_curriculum_a2",
                      "phds_curriculum_a3"]  # one run per swept anchor
  assert not ms["base"].trained and ms["oracle_k2"].k_pre == 2
  configs = {n: cfg_lib.train_config(cfg, m, seed=1) for n, m in ms.items() if m.trained}
  assert configs["naive"].schedule.k_train == (2,) and configs["oracle"].schedule.k_train == (4,)
  assert configs["oracle_k2"].init.path == cfg.oracle_bases[0] and configs["oracle_k2"].eval.ks == (1, 2)
  assert configs["phds_uniform"].schedule.mode == "uniform"
  assert configs["phds_curriculum_a2"].schedule.anchor == 2 and configs["phds_curriculum_a3"].schedule.anchor == 3
  assert configs["phds_curriculum_a3"].schedule.switch_unit == "steps"
  for c in configs.values():
    assert c.seed == 1 and c.num_steps == cfg.train.num_steps and c.optimizer == cfg.train.optimizer
    assert c.checkpoint.keep * c.checkpoint.every_steps > c.num_steps and c.final_eval.tasks == ()
    assert c.select.signal == "mc" and c.select.burn_in_steps == cfg.select.burn_in_steps
  assert configs["oracle_k2"].select.log_ks == (2,) and configs["naive"].select.log_ks == (4,)
  cfg.anchors = ()  # no sweep: one curriculum run under the plain name
  assert [m.name for m in cfg_lib.methods(cfg, k_pre)][-1] == "phds_curriculum"


# ---------------------------------------------------------------------------------------------- smoke run


def test_driver_smoke(tmp_path):
  """A tiny random base, 2 SFT steps, an MC and a perplexity test task at k in {2, 4}, selection on validation
  MC items, a sweep over two anchors: the driver runs, skips done runs on a re-run, and writes its report (the
  oracle-pair logic is covered by the synthetic tests above)."""
  cfg = models.tiny("olmoe", vocab_size=2048, hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8,
                    moe_ffn=8, num_layers=1, max_position_embeddings=256)
  base = str(hf.save(tmp_path / "base", cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
                     tokenizer_dir=os.path.join(ASSETS, "demo_tokenizer")))
  c = compare_demo.get_config("tiny")
  c.base, c.oracle_bases = base, ()
  c.methods, c.seeds, c.compilation_cache = ("base", "phds_curriculum"), (0,), ""
  c.k_train, c.anchors = (2, 4), (2, 4)  # two compiled branches instead of three; two anchors swept
  c.train.num_steps, c.train.batch_size, c.train.data.max_len = 2, 8, 64  # 8 fake devices
  c.train.checkpoint.every_steps, c.train.eval.batches = 1, 1
  data = os.path.join(os.path.dirname(__file__), "testdata", "eval")
  c.eval.update(dict(limit=2, ks=(2, 4), max_new_tokens=4,  # 2 items / documents of each task
                     tasks=("jsonl:" + os.path.join(ASSETS, "demo_sft", "mc_eval.jsonl"),
                            "arc_easy:" + os.path.join(data, "arc_easy.jsonl"),
                            "ppl:" + os.path.join(ASSETS, "demo_power", "ppl_test.txt"),
                            "triviaqa:" + os.path.join(data, "triviaqa.jsonl"))))
  c.select.update(dict(limit=4, burn_in_steps=1, rules=("best_at_kpre", "mean_over_k")))
  c.report.update(dict(pairs=((2, 4),), n_boot=20))
  workdir = str(tmp_path / "wd")
  out = compare.run_comparison(c, workdir)
  for name in ("report.md", "report.json", "accuracy_vs_k.png", "agreement.png"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  t = out["rules"]["best_at_kpre"]
  assert set(t["accuracy"]) == {"base", "phds_curriculum_a2", "phds_curriculum_a4", "phds_curriculum"}
  assert t["n_items"] == 4 and t["ks"] == [2, 4] and set(t["anchors"]) == {0} and t["anchors"][0] in (2, 4)
  assert t["selected_steps"]["phds_curriculum_a2"][0] == 2  # the burn-in of 1 step excludes step 1
  assert set(t["validation"]["phds_curriculum_a4"]) == {0}  # validation MC accuracy of the selected step
  assert t["per_task"]["triviaqa"]["kind"] == "gen" and t["per_task"]["triviaqa"]["n_items"] == 2
  assert t["mc_tasks"] == ["jsonl:mc_eval", "arc_easy"]  # generation is reported per task, not in the MC average
  per_task = [t["per_task"][name]["accuracy"]["base"][4]["mean"] for name in t["mc_tasks"]]
  assert t["accuracy"]["base"][4]["mean"] == pytest.approx(np.mean(per_task))  # the average of task accuracies
  (ppl,) = t["perplexity"].values()
  assert set(ppl) == set(t["accuracy"]) and set(ppl["base"]["mean"]) == {2, 4}
  assert ppl["base"]["relative_increase"][4] == 0.0
  assert {r["row"] for r in t["agreement"]} >= {"base@2 vs @4", "phds_curriculum@2 vs @4"}
  phds_row = next(r for r in t["agreement"] if r["row"] == "phds_curriculum@2 vs @4")
  assert set(phds_row["vs_controls"]) == {"base"}
  assert {c["verdict"] for c in t["claims"]} <= set(report.VERDICTS)
  assert "mean_over_k" in out["rules"]
  run = os.path.join(workdir, "phds_curriculum_a2", "seed0")
  with open(os.path.join(run, "selection.json")) as f:  # the trainer scored the validation items itself
    sel = json.load(f)
  assert sel["signal"] == "mc" and [h["step"] for h in sel["history"]] == [2] and "select_acc_k2" in sel["history"][0]
  assert not os.path.exists(os.path.join(run, "checkpoints"))
  again = compare.run_comparison(c, workdir)  # everything is done: only the report is rebuilt
  assert again["meta"]["train_seconds"] == out["meta"]["train_seconds"] and again["meta"]["runs_executed"] == 0
  assert again["meta"]["wall_seconds"] == out["meta"]["wall_seconds"]  # the timing of the real run is kept
  assert again["rules"]["best_at_kpre"]["accuracy"]["phds_curriculum"][4]["mean"] == \
      t["accuracy"]["phds_curriculum"][4]["mean"]
  c.train.num_steps = 3  # a changed recipe must not silently reuse (or resume) the old runs
  with pytest.raises(cfg_lib.ComparisonConfigError, match="different settings"):
    compare.run_comparison(c, workdir)


def test_heldout_table_reads_the_selected_steps():
  results = [dict(method="naive", seed=s, steps={"best_at_kpre": 20}, val_by_step={
      "10": {"1": 9.0, "4": 9.0}, "20": {"1": 3.0 + s, "4": 2.0}}) for s in (0, 1)]
  results.append(dict(method="base", seed=0, steps={"best_at_kpre": 0}))  # untrained: no log
  table = report.heldout_table(results, "best_at_kpre", [1, 2, 4])
  assert set(table) == {"naive"} and set(table["naive"]) == {1, 4}
  assert table["naive"][1] == dict(per_seed=[3.0, 4.0], mean=3.5)


def test_trainer_selector_burn_in_ties_and_resume():
  """training/protocol.Selector: scored only after the burn-in (and always at the last step), higher wins,
  ties keep the earlier step, and a resume carries the best forward."""
  c = demo.get_config()
  c.num_steps, c.eval.every_steps = 40, 10
  c.select.update(dict(signal="loss", rule="mean_over_k", burn_in_steps=20))
  model_cfg = models.tiny("olmoe", num_experts=8, k_pre=4)
  sel = protocol.Selector(c, model_cfg, None, (2, 3, 4))
  assert sel.ks == [2, 3, 4] and [s for s in range(1, 41) if sel.due(s)] == [30, 40]
  score = lambda loss: sel.score(None, {2: loss + 0.2, 3: loss, 4: loss - 0.2})
  assert score(1.0) == {"select_score": pytest.approx(-1.0)} and sel.score(None, None) == {}
  assert sel.update(30, score(1.0)) and not sel.update(40, score(1.0)) and sel.best_step == 30
  again = protocol.Selector(c, model_cfg, None, (2, 3, 4))
  again.restore(sel.meta())
  assert again.best_step == 30 and not again.update(40, score(1.5)) and again.update(40, score(0.5))
  c.select.update(dict(signal="mc", task=""))
  with pytest.raises(ValueError, match="select.task"):
    protocol.validate_select(c)
  c.select.task = "ppl:x.txt"
  with pytest.raises(ValueError, match="multiple choice"):
    protocol.validate_select(c)


def test_trainer_exports_the_selected_step(tmp_path):
  """select.export='selected': the trainer scores validation MC items after the burn-in, keeps the best step's
  checkpoint, and exports that step's weights (not the last step's) with selection.json saying so."""
  cfg = models.tiny("olmoe", vocab_size=2048, hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8,
                    moe_ffn=8, num_layers=1, max_position_embeddings=256)
  base = str(hf.save(tmp_path / "base", cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
                     tokenizer_dir=os.path.join(ASSETS, "demo_tokenizer")))
  c = demo.get_config()
  c.init.path = c.tokenizer_dir = base
  c.schedule.update(dict(k_train=(2, 4), anchor=2))
  c.num_steps, c.batch_size, c.microbatches, c.data.max_len = 3, 8, 1, 64
  c.checkpoint.update(dict(every_steps=3, async_save=False))  # only the last step is a regular checkpoint
  c.eval.update(dict(every_steps=1, batches=1, ks=(4,)))  # one compiled held-out eval
  c.final_eval.tasks, c.export.hf = (), False
  c.select.update(dict(signal="mc", task="jsonl:" + os.path.join(ASSETS, "demo_sft", "mc_eval.jsonl"), limit=1,
                       burn_in_steps=1, export="selected"))
  result = train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "selection.json") as f:
    sel = json.load(f)
  assert [h["step"] for h in sel["history"]] == [2, 3]  # step 1 is inside the burn-in
  # One item scores the same at both steps: the tie keeps step 2, which was checkpointed because it was best.
  assert sel["selected_step"] == result.selected_step == sel["exported_step"] == 2 and result.final_step == 3
  exported = params_ckpt.load_params(result.orbax_dir)[1]
  at_2 = runs.restore_params(str(tmp_path / "run" / "checkpoints"), 2)
  at_3 = runs.restore_params(str(tmp_path / "run" / "checkpoints"), 3)
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(exported, at_2) and not same(exported, at_3)
