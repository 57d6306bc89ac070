"""AdamW with warmup + decay, global-norm clipping, no decay on norms/biases, optional frozen router."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, decay: str = "cosine",
                           final_fraction: float = 0.0) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine or linear decay to `final_fraction * peak` (or constant)."""
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  end = peak * final_fraction
  if decay == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=final_fraction)
  elif decay == "linear":
    after = optax.linear_schedule(peak, end, rest)
  elif decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise ValueError(f"lr decay {decay!r} is not cosine|linear|constant")
  return optax.join_schedules([warmup, after], [warmup_steps])


def _decay(init: float, end: float, steps: int, decay: str) -> optax.Schedule:
  """From `init` to `end` over `steps` with the configured shape (constant stays at `init`)."""
  if decay == "cosine":
    return optax.cosine_decay_schedule(init, max(steps, 1), alpha=end / init if init else 0.0)
  if decay == "linear":
    return optax.linear_schedule(init, end, max(steps, 1))
  return optax.constant_schedule(init)


def resumed_schedule(peak: float, segments: list[tuple[int, int]], warmup_steps: int, decay: str = "cosine",
                     final_fraction: float = 0.0) -> optax.Schedule:
  """The lr schedule of a run whose `num_steps` was extended on resume, without a jump in lr.

  `segments` is [(0, num_steps_0), (resume_step_1, num_steps_1), ...]: at each resume step the lr continues
  from where the previous schedule had it and decays (same shape) to `final_fraction * peak` at the new
  `num_steps`. An extension before the warmup ends just recomputes the schedule for the new total.
  """
  (_, total), *rest = segments
  sched = learning_rate_schedule(peak, total, warmup_steps, decay, final_fraction)
  for start, total in rest:
    if start <= warmup_steps:
      sched = learning_rate_schedule(peak, total, warmup_steps, decay, final_fraction)
      continue
    tail = _decay(float(sched(start)), peak * final_fraction, total - start, decay)
    sched = optax.join_schedules([sched, tail], [start])
  return sched


def _path_names(path) -> list[str]:
  return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embeddings, expert weights); False for norm scales and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and _path_names(path)[-1] not in ("scale", "bias"), params)


def router_mask(params: Any) -> Any:
  """True for router kernels (frozen when `freeze_router`)."""
  return jax.tree_util.tree_map_with_path(lambda path, x: "router" in _path_names(path), params)


def make_optimizer(config, total_steps: int, params: Any, segments: list[tuple[int, int]] | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer described by `config.optimizer` (lr, warmup_steps, decay, b1, b2, eps, weight_decay, clip).

  `segments`: the run's num_steps history when it was extended on resume (see `resumed_schedule`).
  """
  o = config.optimizer
  segments = segments or [(0, total_steps)]
  schedule = resumed_schedule(o.lr, [tuple(s) for s in segments], o.warmup_steps, o.decay,
                              o.get("final_lr_fraction", 0.0))
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip) if o.clip else optax.identity(),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask(params)),
  )
  if o.get("freeze_router", False):
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), router_mask(params)))
  return tx, schedule
