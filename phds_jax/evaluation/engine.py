"""Batched log-likelihood scoring and greedy KV-cache generation at a static top-k.

k is static, so every (k, input shape) compiles once. To keep that to a handful of compilations, requests are
sorted by length (longest first, as the harness does, so out-of-memory shows up at once), grouped into batches
of exactly `batch_size` rows (short batches are filled with copies of their first row, whose results are
dropped) and padded to a power-of-two length bucket (at least `min_bucket`, at most `max_length`). Scoring pads
on the right, generation on the left (the KV cache needs every prompt to end in the same column).

Only per-token log-probabilities and greedy flags leave the device, never [B, T, V] logits. The jitted
functions are cached per ModelConfig, so repeated `evaluate` calls (notebooks, tests) reuse compilations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax import models, shapes
from phds_jax.models import forward
from phds_jax.models.config import ModelConfig

Ids = list[int]


def bucket_length(n: int, max_length: int, min_bucket: int = 16) -> int:
  """The padded length for a sequence of n tokens: the next power of two in [min_bucket, max_length]."""
  if n > max_length:
    raise ValueError(f"sequence of {n} tokens exceeds max_length {max_length}")
  return shapes.bucket(n, min_bucket, max_length)


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
  return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]


def _fill(rows: list[int], batch_size: int) -> list[int]:
  return rows + [rows[0]] * (batch_size - len(rows))


@functools.lru_cache(maxsize=None)
def _score_fn(cfg: ModelConfig) -> Callable:
  apply = forward.apply_fn(cfg)

  def score(params, tokens, mask, targets, *, k):
    logits, _ = apply(params, tokens, k=k, attention_mask=mask)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprob = target_logit - jax.nn.logsumexp(logits, axis=-1)
    return logprob, jnp.argmax(logits, axis=-1) == targets

  return jax.jit(score, static_argnames=("k",))


@functools.lru_cache(maxsize=None)
def _decode_fns(cfg: ModelConfig) -> tuple[Callable, Callable]:

  def prefill(params, tokens, mask, *, k, cache_len):
    cache = models.init_cache(cfg, tokens.shape[0], cache_len)
    logits_BxV, cache = forward.last_logits(cfg, params, tokens, cache, k=k, attention_mask=mask)
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), cache

  def step(params, tokens, cache, *, k):
    logits_BxV, cache = forward.last_logits(cfg, params, tokens[:, None], cache, k=k)
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), cache

  return (jax.jit(prefill, static_argnames=("k", "cache_len")),
          jax.jit(step, static_argnames=("k",), donate_argnames=("cache",)))


class Engine:
  """Scores and generates with one model at any k; see the module docstring for batching."""

  def __init__(self, cfg: ModelConfig, params: Any, *, batch_size: int = 8, max_length: int | None = None,
               min_bucket: int = 16):
    self.cfg, self.params = cfg, params
    self.batch_size = batch_size
    self.max_length = max_length or cfg.max_position_embeddings
    self.min_bucket = min(min_bucket, self.max_length)
    if batch_size < 1 or self.max_length < 2:
      raise ValueError(f"batch_size={batch_size} and max_length={self.max_length} must be >= 1 and >= 2")

  def _bucket(self, n: int) -> int:
    return bucket_length(n, self.max_length, self.min_bucket)

  def loglikelihood(self, requests: Sequence[tuple[Ids, Ids]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum log p(continuation | context), whether the continuation is the greedy one) per request.

    The input is `(context + continuation)[-(max_length + 1):][:-1]`: contexts are truncated from the left; a
    continuation longer than max_length is an error (the harness asserts the same).
    """
    n = len(requests)
    ll, greedy = np.zeros(n, np.float64), np.zeros(n, bool)
    wholes = []
    for ctx, cont in requests:
      if not cont or len(cont) > self.max_length:
        raise ValueError(f"continuation of {len(cont)} tokens; it must have 1..max_length={self.max_length}")
      if not ctx:
        raise ValueError("empty context: encode it with TextEncoder.encode_pair (it adds a prefix token)")
      wholes.append((list(ctx) + list(cont))[-(self.max_length + 1):])
    fn = _score_fn(self.cfg)
    order = sorted(range(n), key=lambda i: -len(wholes[i]))
    for rows in _batches(order, self.batch_size):
      length = self._bucket(len(wholes[rows[0]]) - 1)
      tokens = np.zeros((self.batch_size, length), np.int32)
      targets, mask = np.zeros_like(tokens), np.zeros_like(tokens)
      for b, i in enumerate(_fill(rows, self.batch_size)):
        w = wholes[i]
        tokens[b, :len(w) - 1], targets[b, :len(w) - 1], mask[b, :len(w) - 1] = w[:-1], w[1:], 1
      logprob, is_greedy = jax.device_get(fn(self.params, tokens, mask, targets, k=k))
      for b, i in enumerate(rows):
        end, n_cont = len(wholes[i]) - 1, len(requests[i][1])
        ll[i] = logprob[b, end - n_cont:end].astype(np.float64).sum()
        greedy[i] = bool(is_greedy[b, end - n_cont:end].all())
    return ll, greedy

  def generate(self, prompts: Sequence[Ids], k: int, *, max_new_tokens: int, stop_ids: Sequence[int] = (),
               is_done: Callable[[Ids], bool] | None = None) -> list[Ids]:
    """Greedy continuations (token ids) of each prompt, batched, with the KV cache.

    A row stops at a token in `stop_ids` (not included) or once `is_done(generated ids)` holds (e.g. a stop
    string appeared; the caller trims the text); the batch stops when all rows have. Prompts are truncated
    from the left to `max_length - max_new_tokens`.
    """
    if max_new_tokens < 1 or max_new_tokens >= self.max_length:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, max_length={self.max_length})")
    room = self.max_length - max_new_tokens
    prompts = [list(p)[-room:] for p in prompts]
    if any(not p for p in prompts):
      raise ValueError("empty prompt")
    prefill, step = _decode_fns(self.cfg)
    out: list[Ids] = [[] for _ in prompts]
    stop = set(stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for rows in _batches(order, self.batch_size):
      length = min(self._bucket(len(prompts[rows[0]])), room)
      tokens = np.zeros((self.batch_size, length), np.int32)
      mask = np.zeros_like(tokens)
      for b, i in enumerate(_fill(rows, self.batch_size)):
        tokens[b, length - len(prompts[i]):], mask[b, length - len(prompts[i]):] = prompts[i], 1
      nxt, cache = prefill(self.params, tokens, mask, k=k, cache_len=length + max_new_tokens)
      done = np.zeros(len(rows), bool)
      for t in range(max_new_tokens):
        ids = np.asarray(jax.device_get(nxt))
        for b, i in enumerate(rows):
          if done[b]:
            continue
          if int(ids[b]) in stop:
            done[b] = True
            continue
          out[i].append(int(ids[b]))
          done[b] = is_done is not None and is_done(out[i])
        if done.all() or t == max_new_tokens - 1:
          break
        nxt, cache = step(self.params, nxt, cache, k=k)
    return out
