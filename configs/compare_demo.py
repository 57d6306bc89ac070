"""PHDS vs its baselines on the shipped demo bases, re-run in one command on 2 CPU cores (docs/reproduction.md).

    python -m phds_jax.experiments.compare --config=configs/compare_demo.py --workdir=runs/compare_demo
    python -m phds_jax.experiments.compare --config=configs/compare_demo.py:tiny ...   # smoke run, ~3 min

Bases (never re-pretrained here): phds_jax/assets/demo_base (k_pre=4) and the oracle bases pretrained at
k=2, 3 with the same recipe (configs/demo_pretrain_oracle.py). Every trained method shares configs/demo.py's
SFT recipe, shortened to fit the time budget; only the init checkpoint and the k schedule differ.
"""

import os

import ml_collections

from configs import demo

ASSETS = demo.ASSETS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "compare_demo"
  c.base = os.path.join(ASSETS, "demo_base")
  c.oracle_bases = tuple(os.path.join(ASSETS, f"oracle_k{k}") for k in (2, 3))  # shipped Oracle-2, Oracle-3
  c.methods = ("base", "naive", "oracle", "oracle_k", "phds_uniform", "phds_curriculum")
  c.naive_k = 2  # (paper) "Naive single-low-k SFT"
  c.k_train = (2, 3, 4)  # (paper) PHDS [2,3,4] for k_pre = 4
  c.anchor = 2  # the low anchor (k_pre/2); ours: the paper reports [2,3,4]->3 too
  c.switch_at = 0.9
  c.ramp = 0.0
  c.seeds = (0, 1, 2)

  t = demo.get_config()
  # configs/demo.py's recipe (lr 1e-3, batch 16 in 2 microbatches, max_len 128), shortened from 150 to 60
  # steps so that 6 trained methods x 3 seeds fit the 30-minute budget on 2 CPU cores.
  t.num_steps = 60
  t.optimizer.lr = 1e-3  # the recipe docs/reproduction.md was run with (configs/demo.py has since moved to 3e-4)
  t.eval.every_steps = 50
  t.optimizer.warmup_steps = 10
  t.checkpoint.update(dict(every_steps=10, async_save=False))  # every 10 steps: the selection candidates
  t.eval.batches = 4
  t.final_eval.tasks = ()
  c.train = t

  c.eval = ml_collections.ConfigDict(dict(
      task="jsonl:" + os.path.join(ASSETS, "demo_sft", "mc_eval.jsonl"), limit=0, batch_size=64, ks=()))
  # (paper) skip a burn-in, then the best validation at k_pre; Reviewer 3's mean over K as the alternative.
  c.select = ml_collections.ConfigDict(dict(burn_in=0.3, primary="best_at_kpre", ks=()))  # ks () = k_train
  c.report = ml_collections.ConfigDict(dict(pairs=((2, 4), (3, 4), (2, 3), (1, 4)), n_boot=1000, seed=0))
  c.keep_checkpoints = False
  c.compilation_cache = os.path.join("runs", "jax_cache")
  c.command = ""
  if arg == "tiny":
    c.name = "compare_demo_tiny"
    c.seeds = (0, 1)
    t.num_steps, t.batch_size, t.microbatches = 4, 4, 1
    t.checkpoint.every_steps, t.eval.batches = 2, 1
    c.eval.limit = 12
    c.report.n_boot = 100
  return c
