"""The model call every consumer shares: one `apply` per ModelConfig, and the wrappers built on it.

Whatever runs the model goes through `apply_fn(cfg)`: `jit_forward` (logits at a static k and router mode),
training's held-out loss (training.step.make_eval_fn), the evaluation engine's scoring and greedy decoding, and
the serving engine's prefill and decode steps. Cache-aware callers use `last_logits` (a prefill when T > 1, a
decode step when T = 1) inside their own jitted functions, so each keeps its static arguments, buffer donation
and on-device loops; k (and the router mode) is always static: each distinct value compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from phds_jax.models.attention import KVCache
from phds_jax.models.config import ModelConfig
from phds_jax.models.transformer import build


def apply_fn(cfg: ModelConfig) -> Callable:
  """`apply(params, tokens_BxT, *, k, mode='hard', **kw)`: the un-jitted model call, returning (logits_BxTxV,
  aux) or, with `cache=`, (logits_BxTxV, aux, cache)."""
  model = build(cfg)

  def apply(params: Any, tokens_BxT: jax.Array, *, k: int, mode: str = "hard", **kwargs):
    return model.apply({"params": params}, tokens_BxT, k=k, mode=mode, **kwargs)

  return apply


def jit_forward(cfg: ModelConfig) -> Callable:
  """`forward(params, tokens, *, k, mode='hard', **kw)`, jitted with k and mode static."""
  return jax.jit(apply_fn(cfg), static_argnames=("k", "mode"))


def last_logits(cfg: ModelConfig, params: Any, tokens_BxT: jax.Array, cache: KVCache, *, k: int,
                attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """One cache-aware call at top-k `k` (hard routing): (logits of the last position [B, V], updated cache).

  Meant to be traced inside the caller's jitted function (prefill: T prompt tokens; decode: T = 1).
  """
  logits_BxTxV, _, cache = apply_fn(cfg)(params, tokens_BxT, k=k, attention_mask=attention_mask, cache=cache)
  return logits_BxTxV[:, -1], cache
