"""The comparison driver: checkpoint selection, table/agreement assembly, config checks, and a smoke run."""

import json
import os

import jax
import numpy as np
import pytest

from configs import compare_demo
from phds_jax import demo_assets, hf, models
from phds_jax.experiments import aggregate as agg
from phds_jax.experiments import config as cfg_lib
from phds_jax.experiments import report, selection

ASSETS = demo_assets.ASSETS_DIR


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
  kw = dict(k_pre=4, ks=(2, 3, 4), num_steps=40, burn_in=0.3)
  assert selection.select_step(VALS, "best_at_kpre", **kw) == 20
  assert selection.select_step(VALS, "mean_over_k", **kw) == 30
  assert selection.select_step(VALS, "best_at_kpre", **dict(kw, burn_in=0.0)) == 10
  assert selection.select_all(VALS, cfg_lib.RULES, **kw) == {"best_at_kpre": 20, "mean_over_k": 30}


def test_selection_edge_cases():
  kw = dict(k_pre=4, ks=(2, 3, 4), num_steps=40)
  assert selection.select_step(VALS, "best_at_kpre", burn_in=0.99, **kw) == 40  # nothing left: the last step
  assert selection.select_step(VALS, "best_at_kpre", burn_in=0.3, available=[30, 40], **kw) == 30
  nan = {20: {4: float("nan")}, 30: {4: 2.0}}
  assert selection.select_step(nan, "best_at_kpre", k_pre=4, ks=(4,), num_steps=30, burn_in=0.0) == 30
  tie = {20: {2: 1.0}, 30: {2: 1.0}}
  assert selection.select_step(tie, "best_at_kpre", k_pre=2, ks=(2, 3, 4), num_steps=30, burn_in=0.0) == 20
  with pytest.raises(ValueError, match="unknown selection rule"):
    selection.select_step(VALS, "best_at_k1", burn_in=0.0, **kw)
  with pytest.raises(ValueError, match="no evaluated steps"):
    selection.candidates([], 10, 0.0)


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
  assert by["oracle@2 vs @4"]["mean"] == 0.0
  assert not any(r["row"].startswith("oracle_k2@2 vs @4") for r in rows)  # a k=2 model has no k=4 point


def test_claims_are_stated_from_the_intervals():
  t = dict(k_pre=4, ks=[1, 2, 3, 4],
           accuracy={"phds_curriculum": {}},
           paired=[dict(subject="phds_curriculum", reference="oracle", k=4, mean=-0.01, lo=-0.03, hi=0.01,
                        p_value=0.4),
                   dict(subject="phds_curriculum", reference="naive", k=2, mean=0.05, lo=0.01, hi=0.09, p_value=0.0),
                   dict(subject="phds_curriculum", reference="naive", k=3, mean=0.0, lo=-0.02, hi=0.02, p_value=1.)],
           agreement=[dict(pair=[2, 4], method="phds_curriculum",
                           vs_oracle_pair=dict(absolute=0.1, lo=0.05, hi=0.15, relative=0.2))],
           relative_drop={"phds_curriculum": {1: 0.4, 2: 0.05, 3: 0.01, 4: 0.0}})
  holds = {c["claim"]: c["holds"] for c in report.claims(t)}
  assert holds["phds_curriculum ≈ Oracle at k_pre=4"] is True
  assert holds["phds_curriculum ahead of naive at k_pre/2 <= k < k_pre"] is False  # not at k=3
  assert holds["phds_curriculum ahead of base at k_pre/2 <= k < k_pre"] is None
  assert holds["phds_curriculum cross-k agreement above separate oracles"] is True
  assert holds["phds_curriculum: cliff below k_pre/2=2"] is True
  t["k_change"] = {"phds_curriculum": {1: dict(mean=-0.1, lo=-0.2, hi=0.01, p_value=0.07)}}  # within noise
  holds = {c["claim"]: c["holds"] for c in report.claims(t)}
  assert holds["phds_curriculum: cliff below k_pre/2=2"] is False


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
    (dict(anchor=1), "anchor=1"),
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
  cfg.select.burn_in = 1.0
  with pytest.raises(cfg_lib.ComparisonConfigError, match="burn_in"):
    cfg_lib.validate(cfg)


def test_methods_share_the_recipe_and_differ_in_schedule(cfg):
  k_pre = cfg_lib.validate(cfg)
  ms = {m.name: m for m in cfg_lib.methods(cfg, k_pre)}
  assert list(ms) == ["base", "naive", "oracle", "oracle_k2", "phds_uniform", "phds_curriculum"]
  assert not ms["base"].trained and ms["oracle_k2"].k_pre == 2
  configs = {n: cfg_lib.train_config(cfg, m, seed=1) for n, m in ms.items() if m.trained}
  assert configs["naive"].schedule.k_train == (2,) and configs["oracle"].schedule.k_train == (4,)
  assert configs["oracle_k2"].init.path == cfg.oracle_bases[0] and configs["oracle_k2"].eval.ks == (1, 2)
  assert configs["phds_uniform"].schedule.mode == "uniform"
  assert configs["phds_curriculum"].schedule.anchor == 2
  for c in configs.values():
    assert c.seed == 1 and c.num_steps == cfg.train.num_steps and c.optimizer == cfg.train.optimizer
    assert c.checkpoint.keep * c.checkpoint.every_steps > c.num_steps and c.final_eval.tasks == ()


# ---------------------------------------------------------------------------------------------- smoke run


def test_driver_smoke(tmp_path):
  """A tiny random base, 2 SFT steps, 4 MC items at k in {2, 4}: the driver runs, skips done runs on a
  re-run, and writes its report (the oracle-pair logic is covered by the synthetic tests above)."""
  from phds_jax.experiments import compare  # pylint: disable=g-import-not-at-top
  cfg = models.tiny("olmoe", vocab_size=2048, hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8,
                    moe_ffn=8, num_layers=1, max_position_embeddings=256)
  base = str(hf.save(tmp_path / "base", cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
                     tokenizer_dir=os.path.join(ASSETS, "demo_tokenizer")))
  c = compare_demo.get_config("tiny")
  c.base, c.oracle_bases = base, ()
  c.methods, c.seeds, c.compilation_cache = ("base", "phds_curriculum"), (0,), ""
  c.k_train, c.anchor = (2, 4), 2  # two compiled branches instead of three
  c.train.num_steps, c.train.batch_size, c.train.data.max_len = 2, 8, 64  # 8 fake devices
  c.train.checkpoint.every_steps, c.train.eval.batches = 1, 1
  c.eval.update(dict(limit=4, ks=(2, 4)))
  c.report.update(dict(pairs=((2, 4),), n_boot=20))
  workdir = str(tmp_path / "wd")
  out = compare.run_comparison(c, workdir)
  for name in ("report.md", "report.json", "accuracy_vs_k.png", "agreement.png"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  t = out["rules"]["best_at_kpre"]
  assert set(t["accuracy"]) == {"base", "phds_curriculum"} and t["n_items"] == 4 and t["ks"] == [2, 4]
  assert t["selected_steps"]["phds_curriculum"][0] == 2  # burn-in 0.3 of 2 steps excludes step 1
  assert {r["row"] for r in t["agreement"]} == {"base@2 vs @4", "phds_curriculum@2 vs @4"}
  assert not os.path.exists(os.path.join(workdir, "phds_curriculum", "seed0", "checkpoints"))
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
