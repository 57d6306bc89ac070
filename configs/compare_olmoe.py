"""PHDS vs its baselines on OLMoE-1B-7B-0125 with the paper's benchmark list, one command (docs/reproduction.md).

    python -m phds_jax.experiments.compare --config=configs/compare_olmoe.py --workdir=runs/compare_olmoe \
      --config.base=/ckpt/OLMoE-1B-7B-0125 --config.eval.data_dir=/data/tfds

Every trained method is configs/olmoe.py's recipe (Tülu-3, one epoch, selection on ARC-Easy validation at
k_pre after a burn-in); the anchor is swept and chosen on validation. The test tasks are the paper's list
(summary): the MC average over ARC-c/e, BoolQ, HellaSwag, PIQA, SciQ, WinoGrande, SIQA, OBQA, plus WikiText
perplexity and TriviaQA. SciQ, SIQA and WikiText have no tfds source here: give local files (see
`python -m phds_jax.eval --help` for the formats). No Oracle-k exists for the public model (only k_pre = 8 was
pretrained), so the well-specified comparison is PHDS vs Oracle at k_pre and agreement is checked against the
single-checkpoint controls. Sized for 8 accelerators, not for a CPU.
"""

import ml_collections

from configs import olmoe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "compare_olmoe"
  c.base = "/ckpt/OLMoE-1B-7B-0125"
  c.oracle_bases = ()
  c.methods = ("base", "naive", "oracle", "phds_uniform", "phds_curriculum")
  c.naive_k = 4  # (review) SFT at one fixed low k; k_pre/2 (ours)
  c.k_train = (4, 5, 6, 7, 8)  # (summary) "mix 4-8"
  c.anchors = (4, 5, 6)  # (review) several anchors, one chosen on validation; the values are ours
  c.anchor = 4
  c.switch_at, c.switch_unit, c.ramp = 0.94, "epochs", 0.0  # (summary) ~93.9% of one epoch
  c.seeds = (0,)  # (summary) the paper's tables are single runs
  c.train = olmoe.get_config(arg)
  c.train.final_eval.tasks = ()
  c.eval = ml_collections.ConfigDict(dict(
      tasks=("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq:/data/sciq/test.jsonl",
             "winogrande", "siqa:/data/siqa/dev.jsonl", "openbookqa", "wikitext:/data/wikitext-2-raw/test.txt",
             "triviaqa"),
      limit=0, batch_size=32, ks=(), max_new_tokens=32, data_dir=""))
  s = c.train.select
  c.select = ml_collections.ConfigDict(dict(signal=s.signal, task=s.task, limit=s.limit, batch_size=s.batch_size,
                                            burn_in_steps=s.burn_in_steps, rules=("best_at_kpre", "mean_over_k"),
                                            primary="best_at_kpre", ks=()))
  c.report = ml_collections.ConfigDict(dict(pairs=((4, 8), (6, 8), (4, 6)), n_boot=1000, seed=0, margin=0.005))
  c.keep_checkpoints = False
  c.compilation_cache = ""
  c.command = ""
  return c
