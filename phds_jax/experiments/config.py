"""The comparison's methods (docs/method.md §4.1) as training configs, and checks of the comparison config.

Every trained method starts from the same recipe (`config.train`: data, steps, batch, optimizer, soft router)
and changes only the init checkpoint and the k schedule, so differences come from the schedule alone:

  base             the pretrained k_pre checkpoint, no SFT (runtime mis-specification when k < k_pre)
  naive            SFT at one fixed low k (`naive_k`)
  oracle           SFT at k_pre (well-specified at k_pre)
  oracle_k         for each base in `oracle_bases` (pretrained at K < k_pre): SFT at K -> methods oracle_k{K}
  phds_uniform     multi-k over K_train, uniform, no curriculum
  phds_curriculum  multi-k over K_train, then anchored at the anchor after `switch_at`; with several `anchors`
                   one run per anchor (phds_curriculum_a{A}), and the report picks one per seed on validation
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from phds_jax import kplan
from phds_jax.evaluation import tasks as task_lib
from phds_jax.experiments import selection
from phds_jax.hf.config import k_pre_of

METHODS = ("base", "naive", "oracle", "oracle_k", "phds_uniform", "phds_curriculum")
RULES = ("best_at_kpre", "mean_over_k")
SIGNALS = ("mc", "loss")
CURRICULUM = "phds_curriculum"


class ComparisonConfigError(ValueError):
  """A comparison config that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the comparison: which checkpoint it starts from and how k is scheduled during SFT."""

  name: str
  init_path: str
  k_pre: int  # the init checkpoint's pretraining k
  schedule: dict | None  # schedule fields for config.train.schedule; None = no training (base)

  @property
  def trained(self) -> bool:
    return self.schedule is not None


def _need(cond: bool, msg: str) -> None:
  if not cond:
    raise ComparisonConfigError(msg)


def checkpoint_k_pre(path: str) -> int:
  """num_experts_per_tok of an HF checkpoint directory (read from config.json only)."""
  file = os.path.join(path, "config.json")
  _need(os.path.isfile(file), f"{path!r} has no config.json: not an HF checkpoint directory")
  with open(file) as f:
    k_pre = k_pre_of(json.load(f))
  _need(k_pre is not None, f"{file} has no num_experts_per_tok: not an MoE checkpoint?")
  return int(k_pre)


def tasks(config: ml_collections.ConfigDict) -> list[str]:
  """The test tasks (`eval.tasks`; a lone `eval.task` of older configs also works)."""
  return list(config.eval.get("tasks") or ()) or ([config.eval.task] if config.eval.get("task") else [])


def anchors(config: ml_collections.ConfigDict) -> list[int]:
  """The curriculum anchors to sweep (`anchors`; a lone `anchor` also works)."""
  return sorted(config.get("anchors") or ()) or [int(config.anchor)]


def swept(config: ml_collections.ConfigDict) -> bool:
  return len(anchors(config)) > 1


def rules(config: ml_collections.ConfigDict) -> list[str]:
  return list(config.select.get("rules") or RULES)


def eval_ks(config: ml_collections.ConfigDict, k_pre: int) -> list[int]:
  """The k every checkpoint is evaluated at: `eval.ks`, default 1..k_pre of the main base."""
  return sorted(config.eval.ks) if config.eval.get("ks") else kplan.default_ks(k_pre)


def validate(config: ml_collections.ConfigDict) -> int:
  """Raises ComparisonConfigError for the first problem; returns k_pre of the main base."""
  unknown = sorted(set(config.methods) - set(METHODS))
  _need(not unknown, f"methods {unknown} are unknown; choose from {METHODS}")
  _need(len(config.methods) > 0, "methods is empty")
  seeds = list(config.seeds)
  _need(len(seeds) > 0, "seeds is empty: give at least one training seed, e.g. (0, 1, 2)")
  _need(len(set(seeds)) == len(seeds), f"seeds {seeds} has repeats")
  k_pre = checkpoint_k_pre(config.base)
  k_train = list(config.k_train)
  _need(len(k_train) > 0, "k_train is empty")
  bad = kplan.ks_outside(k_train, k_pre)
  _need(not bad, f"k_train {tuple(k_train)} is not a subset of [1, k_pre={k_pre}] (bad: {bad})")
  _need(not kplan.ks_outside([config.naive_k], k_pre), f"naive_k={config.naive_k} is outside [1, k_pre={k_pre}]")
  if "phds_curriculum" in config.methods:
    for a in anchors(config):
      _need(min(k_train) <= a <= max(k_train), f"anchor {a} is outside K_train's range [{min(k_train)}, {max(k_train)}]")
  test = tasks(config)
  _need(len(test) > 0, "eval.tasks is empty: give at least one test task (MC, ppl: or triviaqa)")
  try:
    kinds = [t.kind for t in task_lib.get_tasks(test)]
  except ValueError as e:
    raise ComparisonConfigError(f"eval.tasks: {e}") from e
  _need(any(k != task_lib.PPL for k in kinds), "eval.tasks has only perplexity tasks; add a multiple-choice task")
  if "oracle_k" in config.methods:
    _need(len(config.oracle_bases) > 0, "methods include 'oracle_k' but oracle_bases is empty")
    for path in config.oracle_bases:
      k = checkpoint_k_pre(path)
      _need(1 <= k < k_pre, f"oracle base {path!r} was pretrained at k={k}; it must be in [1, k_pre={k_pre})")
  ks = eval_ks(config, k_pre)
  _need(not kplan.ks_outside(ks, k_pre), f"eval.ks {ks} must lie in [1, k_pre={k_pre}]")
  s = config.select
  _need(int(s.burn_in_steps) >= 0, f"select.burn_in_steps={s.burn_in_steps} must be a step count >= 0")
  _need(s.signal in SIGNALS, f"select.signal={s.signal!r} is not one of {SIGNALS}")
  _need(s.signal != "mc" or bool(s.get("task")), "select.signal='mc' needs select.task (a validation MC task)")
  _need(set(rules(config)) <= set(RULES), f"select.rules={tuple(rules(config))} must be among {RULES}")
  _need(s.primary in rules(config), f"select.primary={s.primary!r} is not one of {tuple(rules(config))}")
  _need(float(config.report.get("margin", 0.02)) > 0, "report.margin (the equivalence margin) must be > 0")
  sel_ks = list(s.ks) or k_train
  _need(not kplan.ks_outside(sel_ks, k_pre), f"select.ks {sel_ks} must lie in [1, k_pre={k_pre}]")
  for pair in config.report.pairs:
    _need(len(pair) == 2 and 1 <= pair[0] < pair[1] <= k_pre,
          f"agreement pair {tuple(pair)} must be (k1, k2) with 1 <= k1 < k2 <= k_pre={k_pre}")
  _need(config.train.checkpoint.every_steps >= 1, "train.checkpoint.every_steps must be >= 1")
  return k_pre


def methods(config: ml_collections.ConfigDict, k_pre: int) -> list[Method]:
  """The configured methods in table order (oracle_k expands to one oracle_k{K} per oracle base)."""
  fixed = lambda k: dict(mode="fixed", k_train=(k,), anchor=0)
  k_train = tuple(sorted(config.k_train))
  out = []
  for name in [m for m in METHODS if m in config.methods]:
    if name == "base":
      out.append(Method("base", config.base, k_pre, None))
    elif name == "naive":
      out.append(Method("naive", config.base, k_pre, fixed(config.naive_k)))
    elif name == "oracle":
      out.append(Method("oracle", config.base, k_pre, fixed(k_pre)))
    elif name == "oracle_k":
      for path in sorted(config.oracle_bases, key=checkpoint_k_pre):
        k = checkpoint_k_pre(path)
        out.append(Method(f"oracle_k{k}", path, k, fixed(k)))
    elif name == "phds_uniform":
      out.append(Method("phds_uniform", config.base, k_pre, dict(mode="uniform", k_train=k_train, anchor=0)))
    else:
      for a in anchors(config):
        out.append(Method(f"{CURRICULUM}_a{a}" if swept(config) else CURRICULUM, config.base, k_pre, dict(
            mode="curriculum", k_train=k_train, anchor=a, switch_at=config.switch_at,
            switch_unit=config.get("switch_unit", "fraction"), ramp=config.ramp)))
  return out


def train_config(config: ml_collections.ConfigDict, method: Method, seed: int) -> ml_collections.ConfigDict:
  """config.train with this method's init and schedule, the seed, and every eval step checkpointed.

  Held-out losses are logged at every k <= the model's k_pre; with select.signal='mc' the trainer also scores
  the validation MC task after the burn-in at every k any rule reads (training/protocol.py). Every evaluated
  step keeps its checkpoint, so whichever step a rule picks can be restored and scored.
  """
  c = ml_collections.ConfigDict(config.train.to_dict())
  c.name = f"{config.name}-{method.name}-seed{seed}"
  c.seed = int(seed)
  c.init.update(dict(kind="hf", path=method.init_path))
  c.tokenizer_dir = c.get("tokenizer_dir") or method.init_path
  c.schedule.update(method.schedule)
  every = c.checkpoint.every_steps
  c.eval.update(dict(every_steps=every, ks=tuple(kplan.default_ks(method.k_pre))))
  s = config.select
  log_ks = sorted({k for r in rules(config) for k in _rule_ks(r, method.k_pre, list(s.ks) or list(config.k_train))})
  c.select.update(dict(signal=s.signal, task=s.get("task", ""), limit=s.get("limit", 0),
                       batch_size=s.get("batch_size", 64), rule=s.primary, burn_in_steps=int(s.burn_in_steps),
                       export="final", log_ks=tuple(log_ks)))
  c.checkpoint.keep = max(c.checkpoint.keep, c.num_steps // every + 2)  # keep every candidate (the driver deletes)
  c.final_eval.tasks = ()  # the driver scores the selected checkpoints instead of the last one
  c.export.update(dict(hf=False, orbax=True))
  return c


def _rule_ks(rule: str, k_pre: int, ks: list[int]) -> list[int]:
  return selection.rule_ks(rule, k_pre, ks)
