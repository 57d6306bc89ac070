"""The k plan: what a run does with top-k, worked out and checked once, then read by everything upstream.

k is decided by two configs: the model's (k_pre, the checkpoint's pretraining top-k, and num_experts) and the
run's (the levels the train step compiles, K_train plus the curriculum anchor; the router mode; the ks held-out
loss is measured at). `KPlan` holds both, checked when it is built, so the train step, FLOP counting, held-out
and final evaluation, the experiments driver and serving read one answer instead of re-deriving it.

Two rules stay where the model defines them and the plan only calls them: `router.num_slots` (slots per token
at a level) and `router.ks_outside` (the one k range rule; callers word their errors, because the model allows
any k up to num_experts while training targets k <= k_pre).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from phds_jax.models import router

ks_outside = router.ks_outside


def default_ks(k_pre: int, extra: Iterable[int] = ()) -> list[int]:
  """Every k from 1 to k_pre, plus `extra` (levels or requested ks above k_pre), sorted: what a run is
  evaluated at unless told otherwise."""
  return sorted(set(int(k) for k in extra) | set(range(1, k_pre + 1)))


def eval_ks(ks: Sequence[int] | None, k_pre: int, num_experts: int) -> list[int]:
  """The ks an evaluation runs at (default 1..k_pre), sorted; distinct and runnable by the model."""
  ks = default_ks(k_pre) if ks is None else [int(k) for k in ks]
  if not ks or len(set(ks)) != len(ks) or ks_outside(ks, num_experts):
    raise ValueError(f"ks={ks} must be distinct and within [1, num_experts={num_experts}]")
  return sorted(ks)


def reference_k(k_pre: int, ks: Sequence[int]) -> int:
  """The k other ks are compared with (relative drop, agreement): k_pre when evaluated, else the largest k."""
  return k_pre if k_pre in ks else max(ks)


@dataclasses.dataclass(frozen=True)
class KPlan:
  """The k facts of one training run (see the module docstring); build it with `for_training`.

  Attributes:
    k_pre: the init checkpoint's pretraining top-k (with any `config.model` override applied).
    levels: the k the train step compiles a branch for (K_train plus the anchor), sorted.
    router_mode: 'soft' or 'hard' (routing during training; evaluation always routes hard).
    heldout_ks: the ks held-out loss is measured at.
  """

  k_pre: int
  levels: tuple[int, ...]
  router_mode: str
  heldout_ks: tuple[int, ...]

  @classmethod
  def for_training(cls, k_pre: int, levels: Sequence[int], router_mode: str,
                   requested_eval_ks: Sequence[int] = ()) -> KPlan:
    """The plan of a run; `requested_eval_ks` empty means the default (every level and 1..k_pre).

    Raises ValueError naming the offending value; the config checks word it for the config's fields.
    """
    if router_mode not in router.ROUTER_MODES:
      raise ValueError(f"router mode {router_mode!r} is not one of {router.ROUTER_MODES}")
    requested = tuple(requested_eval_ks or ())
    bad = ks_outside(requested, k_pre)
    if bad:
      raise ValueError(f"eval.ks={requested}: {bad} outside [1, k_pre={k_pre}]")
    levels = tuple(sorted(int(k) for k in levels))
    heldout = tuple(int(k) for k in requested) if requested else tuple(default_ks(k_pre, levels))
    return cls(k_pre=int(k_pre), levels=levels, router_mode=router_mode, heldout_ks=heldout)

  def slots(self, k: int) -> int:
    """Expert slots per token the train step computes at level k (router.num_slots under the run's mode)."""
    return router.num_slots(k, self.k_pre, self.router_mode)

  @property
  def max_slots(self) -> int:
    """Slots per token of the most expensive compiled level: what FLOP counting charges a step."""
    return self.slots(max(self.levels))

  @property
  def final_eval_ks(self) -> list[int]:
    """The ks the exported checkpoint is evaluated at: the held-out ks and every k up to k_pre."""
    return default_ks(self.k_pre, self.heldout_ks)

  def check_model(self, model_cfg: Any) -> None:
    """The loaded model must have the k_pre the plan was checked against (its header said so)."""
    if model_cfg.k_pre != self.k_pre:
      raise ValueError(f"the loaded model has k_pre={model_cfg.k_pre} but its checkpoint header said "
                       f"{self.k_pre}")
