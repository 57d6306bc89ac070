"""Generation at a static top-k: the compiled pieces that batch generation and the server share.

* `generate`: a batch of prompts (left-padded into power-of-two buckets), prefill, then the whole decode loop
  as one `lax.while_loop` on the device: one jitted call per (k, batch bucket, prompt bucket, new-token
  bucket), never one Python dispatch per token.
* `prefill_chunk_fn` / `insert_fn` / `decode_step_fn`: the pieces of continuous batching (scheduler.py). A
  prompt is prefilled into a one-row cache in fixed-size chunks (one compilation per k, whatever the prompt
  length), inserted into its slot of the shared cache, and every step decodes one token for each active slot
  of one k group (per-row cache positions, so rows join and leave independently).
* `time_decode`: per-token latency of exactly the step the server runs (profile.py, benchmarks/decode.py).

Few-token MoE steps take the gathered-weights path (models.experts.routed_experts_gathered), so a batch-1
decode step has no sort, grouped matmul or un-permute.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax import models, shapes
from phds_jax.models import forward as fwd
from phds_jax.models.attention import KVCache
from phds_jax.models.config import ModelConfig
from phds_jax.serve.sampling import RowSampling, SamplingParams, sample

Ids = list[int]


# --------------------------------------------------------------------------------------- batch generation


@functools.lru_cache(maxsize=None)
def _generate_fn(cfg: ModelConfig) -> Callable:

  def run(params, tokens_BxP, mask_BxP, max_new_B, eos_E, samp, *, k: int, new_cap: int):
    b, p = tokens_BxP.shape
    cache = models.init_cache(cfg, b, p + new_cap)
    logits_BxV, cache = fwd.last_logits(cfg, params, tokens_BxP, cache, k=k, attention_mask=mask_BxP)
    first_B = sample(logits_BxV, jnp.zeros((b,), jnp.int32), *samp)
    out_BxN = jnp.full((b, new_cap), -1, jnp.int32)

    def forward(state):
      i, tok_B, cache = state
      logits_BxV, cache = fwd.last_logits(cfg, params, tok_B[:, None], cache, k=k)
      return sample(logits_BxV, jnp.full((b,), i + 1, jnp.int32), *samp), cache

    def body(state):
      i, tok_B, cache, out_BxN, done_B = state
      done_B = done_B | jnp.isin(tok_B, eos_E)
      out_BxN = out_BxN.at[:, i].set(jnp.where(done_B, -1, tok_B))
      done_B = done_B | (i + 1 >= max_new_B)
      finished = jnp.all(done_B) | (i + 1 >= new_cap)
      tok_B, cache = jax.lax.cond(finished, lambda s: (s[1], s[2]), forward, (i, tok_B, cache))
      return i + 1, tok_B, cache, out_BxN, done_B

    def cond(state):
      i, _, _, _, done_B = state
      return (i < new_cap) & ~jnp.all(done_B)

    init = (jnp.int32(0), first_B, cache, out_BxN, jnp.zeros((b,), bool))
    return jax.lax.while_loop(cond, body, init)[3]

  return jax.jit(run, static_argnames=("k", "new_cap"))


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *, k: int,
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             eos_ids: Sequence[int] = (), max_len: int | None = None) -> list[Ids]:
  """New token ids for each prompt at top-k `k` (EOS excluded), one compiled on-device loop per bucket.

  `sampling` is one SamplingParams for all prompts or one per prompt. A prompt plus its max_new_tokens must
  fit `max_len` (default the model's max_position_embeddings); nothing is silently truncated.
  """
  models.check_k(k, cfg.num_experts, cfg.k_pre)
  if not prompts:
    return []
  per_row = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
  if len(per_row) != len(prompts):
    raise ValueError(f"{len(per_row)} SamplingParams for {len(prompts)} prompts")
  for p in per_row:
    p.validate()
  max_len = max_len or cfg.max_position_embeddings
  for i, (prompt, p) in enumerate(zip(prompts, per_row)):
    if not prompt:
      raise ValueError(f"prompt {i} is empty")
    if len(prompt) + p.max_new_tokens > max_len:
      raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} exceed max_len "
                       f"{max_len}")
  b = shapes.bucket(len(prompts))
  p_len = shapes.bucket(max(len(p) for p in prompts), 8)
  new_cap = shapes.bucket(max(p.max_new_tokens for p in per_row), 8)
  rows = list(range(len(prompts))) + [0] * (b - len(prompts))  # filler rows repeat prompt 0, then dropped
  tokens = np.zeros((b, p_len), np.int32)
  mask = np.zeros_like(tokens)
  for r, i in enumerate(rows):
    tokens[r, p_len - len(prompts[i]):] = prompts[i]
    mask[r, p_len - len(prompts[i]):] = 1
  samp = RowSampling.of([per_row[i] for i in rows]).tree()
  max_new = np.array([per_row[i].max_new_tokens for i in rows], np.int32)
  eos = np.array(sorted(set(eos_ids)) or [-1], np.int32)
  out = np.asarray(_generate_fn(cfg)(params, tokens, mask, max_new, eos, samp, k=k, new_cap=new_cap))
  return [[int(t) for t in out[r] if t >= 0] for r in range(len(prompts))]


# ---------------------------------------------------------------------- continuous batching pieces


def init_slots(cfg: ModelConfig, max_batch: int, cache_len: int) -> KVCache:
  """The shared cache of `max_batch` sequence slots, each with its own write position."""
  cache = models.init_cache(cfg, max_batch, cache_len)
  return cache._replace(index=jnp.zeros((max_batch,), jnp.int32))


@functools.lru_cache(maxsize=None)
def prefill_chunk_fn(cfg: ModelConfig) -> Callable:
  """`(params, row_cache, tokens_1xC, mask_1xC, *, k) -> (last logits [1, V], row_cache)`: one chunk of one
  prompt into a one-row cache (scalar write position)."""

  def run(params, row_cache, tokens_1xC, mask_1xC, *, k):
    return fwd.last_logits(cfg, params, tokens_1xC, row_cache, k=k, attention_mask=mask_1xC)

  return jax.jit(run, static_argnames=("k",), donate_argnames=("row_cache",))


@functools.lru_cache(maxsize=None)
def first_token_fn() -> Callable:
  """Samples a request's first token from its prefill logits (step 0 of its random stream)."""
  return jax.jit(lambda logits_1xV, samp: sample(logits_1xV, jnp.zeros((1,), jnp.int32), *samp))


@functools.lru_cache(maxsize=None)
def insert_fn() -> Callable:
  """`(cache, row_cache, slot) -> cache`: copies a prefilled one-row cache into slot `slot` (in place)."""

  def run(cache: KVCache, row: KVCache, slot):
    put = lambda big, one: jax.lax.dynamic_update_slice_in_dim(big, one.astype(big.dtype), slot, axis=0)
    return KVCache(k=tuple(put(a, r) for a, r in zip(cache.k, row.k)),
                   v=tuple(put(a, r) for a, r in zip(cache.v, row.v)),
                   key_mask=put(cache.key_mask, row.key_mask), next_pos=put(cache.next_pos, row.next_pos),
                   index=put(cache.index, row.index[None]))

  return jax.jit(run, donate_argnames=("cache",))


@functools.lru_cache(maxsize=None)
def decode_step_fn(cfg: ModelConfig) -> Callable:
  """`(params, cache, tokens_B, active_B, step_B, samp, *, k, n_steps=1) -> (tokens [B, n_steps], cache)`.

  Decodes `n_steps` tokens per active row in one call (each sampled token fed back on the device), so the
  per-call dispatch and host sync are paid once per n_steps tokens. Rows with active=False (free slots, or
  another k group's rows) neither see nor leave anything: their token is masked out of attention and the MoE
  statistics, and their write position does not move.
  """

  def one(params, cache, tokens_B, active_B, step_B, samp, k):
    valid_Bx1 = active_B[:, None].astype(jnp.int32)
    logits_BxV, new_cache = fwd.last_logits(cfg, params, tokens_B[:, None], cache, k=k, attention_mask=valid_Bx1)
    new_cache = new_cache._replace(index=jnp.where(active_B, new_cache.index, cache.index))
    return sample(logits_BxV, step_B, *samp), new_cache

  def run(params, cache, tokens_B, active_B, step_B, samp, *, k, n_steps=1):
    if n_steps == 1:
      tok_B, cache = one(params, cache, tokens_B, active_B, step_B, samp, k)
      return tok_B[:, None], cache

    def body(i, state):
      tok_B, cache, out_BxN = state
      tok_B, cache = one(params, cache, tok_B, active_B, step_B + i, samp, k)
      return tok_B, cache, out_BxN.at[:, i].set(tok_B)

    out_BxN = jnp.zeros((tokens_B.shape[0], n_steps), jnp.int32)
    _, cache, out_BxN = jax.lax.fori_loop(0, n_steps, body, (tokens_B, cache, out_BxN))
    return out_BxN, cache

  return jax.jit(run, static_argnames=("k", "n_steps"), donate_argnames=("cache",))


def time_decode(cfg: ModelConfig, params: Any, *, k: int, batch_size: int, context_len: int,
                new_tokens: int = 32, repeats: int = 3, steps_per_call: int = 1) -> np.ndarray:
  """Milliseconds per decoded token (one for each of `batch_size` rows), about `repeats × new_tokens` samples.

  Times the server's own step (decode_step_fn, greedy, `steps_per_call` tokens per call) on a cache holding
  `context_len` real tokens per row, each call waited for, so the numbers include dispatch and the host sync:
  what a client of the server sees per token. A call of n steps gives n samples of its time / n.
  """
  models.check_k(k, cfg.num_experts, cfg.k_pre)
  calls = max(1, -(-new_tokens * repeats // steps_per_call))
  cache_len = context_len + calls * steps_per_call + 1
  cache = init_slots(cfg, batch_size, cache_len)
  row = models.init_cache(cfg, 1, cache_len)
  tokens = np.ones((1, context_len), np.int32)
  _, row = prefill_chunk_fn(cfg)(params, row, tokens, np.ones_like(tokens), k=k)
  for slot in range(batch_size):
    cache = insert_fn()(cache, row, slot)
  step = functools.partial(decode_step_fn(cfg), k=k, n_steps=steps_per_call)
  active = np.ones((batch_size,), bool)
  samp = RowSampling.of([SamplingParams()] * batch_size).tree()
  warm = step(params, init_slots(cfg, batch_size, cache_len), np.ones(batch_size, np.int32), active,
              np.zeros(batch_size, np.int32), samp)  # compiles, on a throwaway cache
  jax.block_until_ready(warm)
  tok = np.ones((batch_size,), np.int32)
  times = []
  for i in range(calls):
    start = time.perf_counter()
    out, cache = step(params, cache, tok, active, np.full(batch_size, i * steps_per_call, np.int32), samp)
    tok = np.asarray(jax.device_get(out))[:, -1]
    times += [(time.perf_counter() - start) * 1e3 / steps_per_call] * steps_per_call
  return np.asarray(times)
