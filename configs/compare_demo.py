"""PHDS vs its baselines on the shipped demo bases, in one command on 2 CPU cores (docs/reproduction.md).

    python -m phds_jax.experiments.compare --config=configs/compare_demo.py --workdir=runs/compare_demo
    python -m phds_jax.experiments.compare --config=configs/compare_demo.py:tiny ...   # smoke run

Bases (never re-pretrained here): phds_jax/assets/demo_base (k_pre=4) and the oracle bases pretrained at
k=2, 3 with the same recipe (configs/demo_pretrain_oracle.py). Data: phds_jax/assets/demo_power
(tools/toy_data.py), an SFT split of the demo sentences with 1,188 held-out test items (a 95%
CI of about ±0.03), 298 validation items for selection and a perplexity text. Every trained method shares
configs/demo.py's SFT recipe; only the init checkpoint and the k schedule differ. Tags as in docs/method.md:
(summary), (review), (inferred), (ours).
"""

import os

import ml_collections

from configs import demo

ASSETS = demo.ASSETS
POWER = os.path.join(ASSETS, "demo_power")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "compare_demo"
  c.base = os.path.join(ASSETS, "demo_base")
  c.oracle_bases = tuple(os.path.join(ASSETS, f"oracle_k{k}") for k in (2, 3))  # shipped Oracle-2, Oracle-3
  c.methods = ("base", "naive", "oracle", "oracle_k", "phds_uniform", "phds_curriculum")
  c.naive_k = 2  # (review) "SFT on a single fixed K"; 2 = k_pre/2 (ours)
  c.k_train = (2, 3, 4)  # (summary) PHDS [2,3,4] for k_pre = 4
  # (summary) "[2,3,4]->3" on the internal k_pre = 4 model; 2 = k_pre/2 (inferred); (review) several anchors
  # were tried and one chosen on validation: one run per anchor, the choice per seed by the selection signal.
  c.anchors = (2, 3)
  c.anchor = 2  # used only when `anchors` is empty
  # (summary) the curriculum began at ~93.9% of one epoch; here it starts at step 80 of 85, the same share
  # (0.94) of training (ours: how far past one epoch the paper ran is unknown).
  c.switch_at, c.switch_unit = 80.0, "steps"
  c.ramp = 0.0  # hard switch (ours)
  c.seeds = (0,)  # one training seed: the intervals cover test items only (the 2-core time budget, ours)

  t = demo.get_config()
  t.data.path = os.path.join(POWER, "train.jsonl")  # 1,449 completion chats: 416 packed rows, 26 steps an epoch
  # ours: 85 steps = 3.3 epochs of the packed data (the trainer prints the count). docs/reproduction.md was made
  # with num_epochs = 3 and an epoch counted with one packing bin (452 rows), which came to these 85 steps and
  # the switch at step 80; they are pinned here so that the command reproduces it.
  t.num_epochs, t.num_steps = 0, 85
  t.optimizer.lr = 1e-3  # ours: the recipe of the first comparison (configs/demo.py has moved to 3e-4)
  t.optimizer.warmup_steps = 10
  t.checkpoint.update(dict(every_steps=15, async_save=False, keep=1000))  # every 15 steps: the candidates
  t.eval.batches = 4
  t.final_eval.tasks = ()
  c.train = t

  c.eval = ml_collections.ConfigDict(dict(
      tasks=("jsonl:" + os.path.join(POWER, "mc_test.jsonl"), "ppl:" + os.path.join(POWER, "ppl_test.txt")),
      limit=0, batch_size=64, ks=(), max_new_tokens=32))
  # (summary) after a burn-in, the best multiple-choice validation accuracy at k_pre; the paper's burn-in is
  # 5,000 steps, here 45 of 85 (ours). mean_over_k (review) is supported but costs 3x the scoring: left out.
  c.select = ml_collections.ConfigDict(dict(
      signal="mc", task="jsonl:" + os.path.join(POWER, "mc_valid.jsonl"), limit=0, batch_size=64,
      burn_in_steps=45, rules=("best_at_kpre",), primary="best_at_kpre", ks=()))  # ks () = k_train
  # margin: the equivalence margin for "≈" claims, in absolute accuracy (ours: about the paper's own
  # public-model differences, "at the third decimal" (review), is far below what 1,188 items can resolve).
  c.report = ml_collections.ConfigDict(dict(pairs=((2, 4), (3, 4), (2, 3)), n_boot=1000, seed=0, margin=0.02))
  c.keep_checkpoints = False
  c.compilation_cache = os.path.join("runs", "jax_cache")
  c.command = ""
  if arg == "tiny":
    c.name = "compare_demo_tiny"
    c.seeds = (0, 1)
    t.num_epochs, t.num_steps, t.batch_size, t.microbatches = 0, 4, 4, 1
    c.switch_at, c.switch_unit = 0.75, "fraction"
    t.checkpoint.every_steps, t.eval.batches = 2, 1
    c.eval.limit = 12
    c.select.update(dict(limit=12, burn_in_steps=1))
    c.report.n_boot = 100
  return c
