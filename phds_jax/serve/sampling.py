"""Per-request sampling settings and the on-device sampler they drive.

Every setting is a per-row array inside the compiled step, so one compilation serves any mix of greedy and
sampled requests in a batch. A row's random key is `fold_in(key(seed), i)` for its i-th generated token: a
seeded request draws the same tokens whether it runs alone, in a batch, or in the continuous-batching server.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request picks its tokens. temperature 0 = greedy (argmax, ties to the lowest id); top_k 0 = off."""

  max_new_tokens: int = 16
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0

  def validate(self) -> "SamplingParams":
    """Raises ValueError naming the offending field; returns self so calls chain."""
    checks = (
        ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
        ("temperature", _is_real(self.temperature) and 0.0 <= self.temperature <= 100.0, "a number in [0, 100]"),
        ("top_p", _is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "a number in (0, 1]"),
        ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
        ("seed", _is_int(self.seed) and 0 <= self.seed < 2**31, "an integer in [0, 2**31)"),
    )
    for field, ok, want in checks:
      if not ok:
        raise ValueError(f"{field} must be {want}, got {getattr(self, field)!r}")
    return self


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
  return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class RowSampling:
  """SamplingParams of B rows as host arrays, the form the compiled steps take."""

  temperature_B: np.ndarray  # float32
  top_p_B: np.ndarray  # float32
  top_k_B: np.ndarray  # int32
  seed_B: np.ndarray  # int32

  @classmethod
  def of(cls, params: list[SamplingParams]) -> "RowSampling":
    return cls(np.array([p.temperature for p in params], np.float32), np.array([p.top_p for p in params], np.float32),
               np.array([p.top_k for p in params], np.int32), np.array([p.seed for p in params], np.int32))

  def tree(self) -> tuple[np.ndarray, ...]:
    return (self.temperature_B, self.top_p_B, self.top_k_B, self.seed_B)


def sample(logits_BxV: jax.Array, step_B: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array,
           top_k_B: jax.Array, seed_B: jax.Array) -> jax.Array:
  """Next token per row [B] int32: argmax where temperature is 0, else a draw from the temperature-scaled
  distribution restricted to the top_k most likely tokens and the smallest prefix holding top_p of the mass.

  The sort over the vocabulary runs only when some row samples (a `lax.cond`), so greedy batches pay an argmax.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

  def draw(_):
    vocab = logits_BxV.shape[-1]
    scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
    order_BxV = jnp.argsort(-scaled_BxV, axis=-1, stable=True)
    sorted_BxV = jnp.take_along_axis(scaled_BxV, order_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    rank_V = jnp.arange(vocab)
    limit_B = jnp.where(top_k_B > 0, top_k_B, vocab)
    keep_BxV = (mass_before_BxV < top_p_B[:, None]) & (rank_V[None, :] < limit_B[:, None])
    keep_BxV = keep_BxV.at[:, 0].set(True)  # the most likely token always stays
    masked_BxV = jnp.where(keep_BxV, sorted_BxV, -jnp.inf)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seed_B, step_B)
    pick_B = jax.vmap(jax.random.categorical)(keys, masked_BxV)
    sampled_B = jnp.take_along_axis(order_BxV, pick_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature_B > 0, sampled_B, greedy_B)

  return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda _: greedy_B, None)
