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


def _path_names(path) -> list[str]:
  return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embeddings, expert weights); False for norm scales and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim >= 2 and _path_names(path)[-1] not in ("scale", "bias"), params)


def router_mask(params: Any) -> Any:
  """True for router kernels (frozen when `freeze_router`)."""
  return jax.tree_util.tree_map_with_path(lambda path, x: "router" in _path_names(path), params)


def make_optimizer(config, total_steps: int, params: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer described by `config.optimizer` (lr, warmup_steps, decay, b1, b2, eps, weight_decay, clip).

  The schedule's input is Adam's count: updates applied (a skipped non-finite step does not advance it).
  """
  o = config.optimizer
  schedule = learning_rate_schedule(o.lr, total_steps, o.warmup_steps, o.decay, o.get("final_lr_fraction", 0.0))
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip) if o.clip else optax.identity(),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask(params)),
  )
  if o.get("freeze_router", False):
    tx = optax.chain(tx, optax.masked(optax.set_to_zero(), router_mask(params)))
  return tx, schedule
