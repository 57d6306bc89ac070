"""The k curriculum: which top-k level each optimizer step (or microbatch) trains at.

PHDS (docs/method.md §1.2-1.3) samples one global k per forward pass uniformly from K_train, then, for a short final
window, anchors at a low k. The shape of that anchor is not known, so both readings are here: a hard switch
(`ramp=0`) and a linear ramp of the sampling probabilities to a point mass on the anchor.

k is a pure function of (seed, step, microbatch): every host draws the same k without communication, and a
resumed run draws exactly the k it would have drawn. Sampling runs on the host; the compiled train step receives
level *indices* and switches between per-k branches, so nothing recompiles when k changes.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import ml_collections
import numpy as np

from phds_jax import kplan


class ScheduleError(ValueError):
  """An inconsistent k schedule."""


@dataclasses.dataclass(frozen=True)
class KSchedule:
  """A distribution over top-k levels for each training step.

  Attributes:
    k_train: the levels sampled during the mixing phase (K_train).
    mode: 'fixed' (one k: Naive/Oracle baselines, pretraining), 'uniform' (multi-k without curriculum),
      'curriculum' (multi-k, then anchored at `anchor`).
    anchor: the low k the curriculum ends at.
    switch_at: fraction of training after which the curriculum starts (summary: ~0.94 of an epoch; the
      trainer converts steps/epochs to this fraction, training/protocol.py).
    ramp: fraction of training over which probabilities move linearly to the anchor; 0 = hard switch.
    probs: optional custom mixing probabilities, aligned with k_train (default uniform).
    total_steps: length of training, for the fractions.
    granularity: 'step' (one k per optimizer step) or 'microbatch' (one k per accumulation microbatch).
    seed: sampling seed.
  """

  k_train: tuple[int, ...]
  mode: Literal["fixed", "uniform", "curriculum"] = "uniform"
  anchor: int | None = None
  switch_at: float = 0.94
  ramp: float = 0.0
  probs: tuple[float, ...] | None = None
  total_steps: int = 1
  granularity: Literal["step", "microbatch"] = "microbatch"
  seed: int = 0

  @property
  def levels(self) -> tuple[int, ...]:
    """Distinct k values the train step must compile a branch for (K_train plus the anchor)."""
    extra = (self.anchor,) if self.mode == "curriculum" and self.anchor is not None else ()
    return tuple(sorted(set(self.k_train) | set(extra)))


def from_config(config: ml_collections.ConfigDict) -> KSchedule:
  """The run's schedule from a training config: the one place `config.schedule` becomes a KSchedule.

  `switch_at` / `ramp` are fractions once training/protocol.py has resolved their units (the trainer builds
  its schedule from that resolved config). In a config still giving them in steps or epochs they read as 0.0
  here: the k levels and the other fields are checked all the same, the timing when protocol.py resolves it.
  """
  s = config.schedule
  fraction = lambda value, unit_field: value if s.get(unit_field, "fraction") == "fraction" else 0.0
  return KSchedule(
      k_train=tuple(s.k_train), mode=s.mode, anchor=s.get("anchor") or None,
      switch_at=fraction(s.switch_at, "switch_unit"), ramp=fraction(s.ramp, "ramp_unit"),
      probs=tuple(s.probs) if s.get("probs") else None, total_steps=config.num_steps, granularity=s.granularity,
      seed=config.seed)


def fixed(k: int, total_steps: int = 1, **kw) -> KSchedule:
  return KSchedule(k_train=(k,), mode="fixed", total_steps=total_steps, **kw)


def validate(s: KSchedule, k_pre: int) -> None:
  """Raises ScheduleError naming the offending field (run before anything compiles)."""
  if not s.k_train:
    raise ScheduleError("K_train is empty")
  if len(set(s.k_train)) != len(s.k_train):
    raise ScheduleError(f"K_train {s.k_train} has repeated levels")
  for k in kplan.ks_outside(s.k_train, k_pre)[:1]:
    raise ScheduleError(f"K_train level {k!r} is outside [1, k_pre={k_pre}]")
  if s.mode not in ("fixed", "uniform", "curriculum"):
    raise ScheduleError(f"schedule mode {s.mode!r} is not fixed|uniform|curriculum")
  if s.mode == "fixed" and len(s.k_train) != 1:
    raise ScheduleError(f"mode 'fixed' needs exactly one k, got K_train={s.k_train}")
  if s.mode == "curriculum":
    if s.anchor is None:
      raise ScheduleError("mode 'curriculum' needs an anchor k")
    if not min(s.k_train) <= s.anchor <= max(s.k_train):
      raise ScheduleError(f"anchor {s.anchor} is outside K_train's range [{min(s.k_train)}, {max(s.k_train)}]")
  for name in ("switch_at", "ramp"):
    value = getattr(s, name)
    if not 0.0 <= value <= 1.0:
      raise ScheduleError(f"{name}={value} must be a fraction in [0, 1]")
  if s.probs is not None:
    p = np.asarray(s.probs, np.float64)
    if p.shape != (len(s.k_train),) or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
      raise ScheduleError(f"probs {s.probs} must be {len(s.k_train)} non-negative numbers summing to 1")
  if s.total_steps < 1:
    raise ScheduleError(f"total_steps={s.total_steps} must be >= 1")
  if s.granularity not in ("step", "microbatch"):
    raise ScheduleError(f"granularity {s.granularity!r} is not step|microbatch")


def probabilities(s: KSchedule, step: int) -> np.ndarray:
  """Sampling probabilities over `s.levels` at `step`."""
  levels = s.levels
  base = np.zeros(len(levels))
  mix = np.full(len(s.k_train), 1.0 / len(s.k_train)) if s.probs is None else np.asarray(s.probs, float)
  for k, p in zip(s.k_train, mix):
    base[levels.index(k)] = p
  if s.mode != "curriculum":
    return base
  frac = step / s.total_steps
  if frac < s.switch_at:
    return base
  anchor = np.zeros(len(levels))
  anchor[levels.index(s.anchor)] = 1.0
  t = 1.0 if s.ramp == 0 else min((frac - s.switch_at) / s.ramp, 1.0)
  return (1.0 - t) * base + t * anchor


def level_indices(s: KSchedule, step: int, num_microbatches: int) -> np.ndarray:
  """int32 [num_microbatches]: index into `s.levels` for each microbatch of `step`."""
  p = probabilities(s, step)
  draws = num_microbatches if s.granularity == "microbatch" else 1
  out = np.empty(draws, np.int32)
  for m in range(draws):
    rng = np.random.default_rng([s.seed, step, m])
    out[m] = rng.choice(len(p), p=p)
  return np.broadcast_to(out, (num_microbatches,)).copy() if draws == 1 else out


def ks_for_step(s: KSchedule, step: int, num_microbatches: int) -> list[int]:
  """The k of each microbatch at `step` (what the logs show)."""
  return [s.levels[i] for i in level_indices(s, step, num_microbatches)]


def histogram(s: KSchedule, steps: Sequence[int], num_microbatches: int) -> dict[int, int]:
  """How many microbatches train at each k over `steps`."""
  counts = {k: 0 for k in s.levels}
  for step in steps:
    for k in ks_for_step(s, step, num_microbatches):
      counts[k] += 1
  return counts


# ------------------------------------------------------------------------------ units of the curriculum window

UNITS = ("fraction", "steps", "epochs")


def to_fraction(value: float, unit: str, total_steps: int, steps_per_epoch: float | None) -> float:
  """A point of training given in `unit` as a fraction of `total_steps` (what KSchedule holds).

  'fraction': of all steps (as KSchedule); 'steps': an optimizer-step count; 'epochs': a number of passes over
  the packed training split (the reported timing is "~93.9% of one epoch", docs/method.md §1.3).
  """
  if unit not in UNITS:
    raise ScheduleError(f"unit {unit!r} is not one of {UNITS}")
  if value < 0:
    raise ScheduleError(f"{value} {unit} is negative")
  if unit == "fraction":
    return float(value)
  steps = float(value) if unit == "steps" else float(value) * _need_epoch(steps_per_epoch)
  return min(steps / total_steps, 1.0)


def _need_epoch(steps_per_epoch: float | None) -> float:
  if not steps_per_epoch or steps_per_epoch <= 0:
    raise ScheduleError("an epoch-based value needs the steps per epoch of the packed training data")
  return float(steps_per_epoch)


def num_steps_for(num_steps: int, num_epochs: float, steps_per_epoch: float | None) -> int:
  """Training length: `num_epochs` passes over the packed data when > 0 (rounded up), else `num_steps`."""
  if num_epochs and num_epochs > 0:
    return max(1, int(np.ceil(num_epochs * _need_epoch(steps_per_epoch))))
  return int(num_steps)


def derivation(*, rows_per_epoch: int | None, batch_size: int, num_steps: int, num_epochs: float,
               switch_at: float, switch_unit: str, ramp: float, ramp_unit: str, mode: str) -> str:
  """One paragraph saying how the step counts were obtained (printed at the start of training)."""
  spe = None if rows_per_epoch is None else rows_per_epoch / batch_size
  parts = []
  if spe is not None:
    parts.append(f"one epoch = {rows_per_epoch} packed rows / batch {batch_size} = {spe:.1f} steps")
  if num_epochs and num_epochs > 0:
    parts.append(f"num_epochs {num_epochs:g} -> num_steps {num_steps}")
  else:
    parts.append(f"num_steps {num_steps}" + (f" = {num_steps / spe:.2f} epochs" if spe else ""))
  if mode == "curriculum":
    start = to_fraction(switch_at, switch_unit, num_steps, spe)
    width = to_fraction(ramp, ramp_unit, num_steps, spe)
    parts.append(f"curriculum from step {start * num_steps:.0f} ({switch_at:g} {switch_unit}"
                 + (f" = {start * num_steps / spe:.3f} epochs" if spe else "") + ")"
                 + (f", ramp over {width * num_steps:.0f} steps" if width else ", hard switch to the anchor"))
  return "; ".join(parts)
