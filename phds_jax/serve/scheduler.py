"""Continuous batching over a fixed set of sequence slots, with requests at different k in per-k groups.

One engine thread owns the device state: a shared KV cache of `max_batch` slots (each row with its own write
position) and, per slot, the request it serves. Each iteration it (1) drops cancelled requests, (2) admits
waiting requests into free slots (chunked prefill into a one-row cache, first token, insert), and (3) for every
k that has active slots, runs that k's compiled decode step over the slots (other rows masked out) and hands
each new token to its request's listener. Requests join and leave between steps; nothing compiles after
`warmup()`, which compiles the prefill chunk, the insert and the decode step of every offered k.

The listener is called from the engine thread: `Event(token, None)` per generated token, then exactly one
`Event(None, reason)` with reason "stop" (EOS), "length", "cancelled" or "error".
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from phds_jax import models, shapes
from phds_jax.models.config import ModelConfig
from phds_jax.serve import engine
from phds_jax.serve.sampling import RowSampling, SamplingParams

log = logging.getLogger(__name__)


class RequestError(ValueError):
  """A request that can never be served as asked; `field` names the offending request field."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field, self.message = field, message


class QueueFull(RuntimeError):
  """`max_queue` requests are already waiting: try again later."""


class ShuttingDown(RuntimeError):
  """The scheduler no longer accepts requests."""


class Event(NamedTuple):
  token: int | None
  finish_reason: str | None


@dataclasses.dataclass(eq=False)
class _Request:
  id: int
  prompt: list[int]
  k: int
  sampling: SamplingParams
  listener: Callable[[Event], None]
  cancelled: bool = False
  generated: int = 0
  finished: bool = False


class Handle:
  """The caller's side of a submitted request."""

  def __init__(self, request: _Request, scheduler: "Scheduler"):
    self._request, self._scheduler = request, scheduler

  @property
  def id(self) -> int:
    return self._request.id

  @property
  def k(self) -> int:
    return self._request.k

  def cancel(self) -> None:
    """Frees the request's slot at the next step; its listener then receives finish_reason "cancelled"."""
    self._request.cancelled = True
    self._scheduler._notify()


class Scheduler:
  """See the module docstring. Thread-safe `submit`; one background engine thread after `start()`."""

  def __init__(self, cfg: ModelConfig, params: Any, *, ks: Sequence[int], max_batch: int = 8,
               max_len: int = 512, max_queue: int = 64, eos_ids: Sequence[int] = (), prefill_chunk: int = 64,
               steps_per_call: int = 1):
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks:
      raise ValueError("ks must offer at least one k")
    for k in ks:
      models.check_k(k, cfg.num_experts, cfg.k_pre)
    if max_batch < 1 or max_queue < 0 or max_len < 2 or prefill_chunk < 1 or steps_per_call < 1:
      raise ValueError(f"need max_batch >= 1, max_queue >= 0, max_len >= 2, prefill_chunk >= 1, steps_per_call "
                       f">= 1; got {max_batch}, {max_queue}, {max_len}, {prefill_chunk}, {steps_per_call}")
    self.cfg, self.params, self.ks = cfg, params, ks
    self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
    self.eos_ids = frozenset(int(e) for e in eos_ids)
    self.chunk = min(shapes.bucket(prefill_chunk), shapes.bucket(max_len))
    self.steps_per_call = steps_per_call
    # Room for the left padding of a prompt's first chunk and the steps a call runs past a row's end.
    self.cache_len = max_len + self.chunk + steps_per_call
    self._cond = threading.Condition()
    self._waiting: collections.deque[_Request] = collections.deque()
    self._slots: list[_Request | None] = [None] * max_batch
    self._ids = itertools.count()
    self._accepting = True
    self._stop = False
    self._thread: threading.Thread | None = None
    self._reset_device_state()

  # ------------------------------------------------------------------------------------------ public API

  @property
  def num_active(self) -> int:
    return sum(r is not None for r in self._slots)

  @property
  def num_queued(self) -> int:
    return len(self._waiting)

  def warmup(self) -> None:
    """Compiles every offered k's prefill chunk, insert and decode step, so serving never compiles."""
    for k in self.ks:
      start = time.perf_counter()
      self._prefill_into_slot([1], k, SamplingParams(), slot=0)
      self._decode(k, [0])
      log.info("compiled k=%d (prefill chunk %d, decode batch %d) in %.1f s", k, self.chunk, self.max_batch,
               time.perf_counter() - start)
    self._reset_device_state()

  def start(self) -> None:
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name="phds-scheduler", daemon=True)
      self._thread.start()

  def submit(self, prompt: Sequence[int], *, k: int, sampling: SamplingParams,
             listener: Callable[[Event], None]) -> Handle:
    """Queues one request; raises RequestError (bad field), QueueFull or ShuttingDown instead of queueing."""
    self._check(prompt, k, sampling)
    with self._cond:
      if not self._accepting:
        raise ShuttingDown("the server is shutting down")
      free_slots = sum(r is None for r in self._slots)  # admitted at the next step, so not queueing
      if len(self._waiting) >= self.max_queue + free_slots:
        raise QueueFull(f"{len(self._waiting)} requests are already waiting for {self.max_batch} busy slots")
      request = _Request(next(self._ids), list(map(int, prompt)), k, sampling, listener)
      self._waiting.append(request)
      self._cond.notify_all()
    return Handle(request, self)

  def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops accepting; with `drain` finishes in-flight and queued requests, else cancels them; joins."""
    with self._cond:
      self._accepting = False
      if not drain:
        for r in list(self._waiting) + [r for r in self._slots if r is not None]:
          r.cancelled = True
      self._stop = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)

  # --------------------------------------------------------------------------------------- validation

  def _check(self, prompt: Sequence[int], k: Any, sampling: SamplingParams) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k not in self.ks:
      raise RequestError("k", f"k={k!r} is not offered by this server; offered: {list(self.ks)}")
    try:
      sampling.validate()
    except ValueError as e:
      raise RequestError(str(e).split(" ", 1)[0], str(e)) from None
    if len(prompt) == 0:
      raise RequestError("prompt", "the prompt is empty")
    if not all(isinstance(t, (int, np.integer)) and 0 <= t < self.cfg.vocab_size for t in prompt):
      raise RequestError("prompt", f"token ids must be integers in [0, {self.cfg.vocab_size})")
    if len(prompt) + sampling.max_new_tokens > self.max_len:
      raise RequestError("max_tokens" if len(prompt) < self.max_len else "prompt",
                         f"the prompt has {len(prompt)} tokens and max_tokens is {sampling.max_new_tokens}: "
                         f"together they exceed this server's max_len {self.max_len}")

  # ----------------------------------------------------------------------------------- device state

  def _reset_device_state(self) -> None:
    self._cache = engine.init_slots(self.cfg, self.max_batch, self.cache_len)
    self._last_tok = np.zeros(self.max_batch, np.int32)
    self._step = np.zeros(self.max_batch, np.int32)
    self._samp = RowSampling.of([SamplingParams()] * self.max_batch)

  def _prefill_into_slot(self, prompt: list[int], k: int, sampling: SamplingParams, slot: int) -> int:
    """Prefills `prompt` chunk by chunk into a one-row cache, inserts it at `slot`; returns the first token."""
    n_chunks = -(-len(prompt) // self.chunk)
    padded = np.zeros(n_chunks * self.chunk, np.int32)
    mask = np.zeros_like(padded)
    padded[len(padded) - len(prompt):], mask[len(padded) - len(prompt):] = prompt, 1
    row = models.init_cache(self.cfg, 1, self.cache_len)
    prefill = engine.prefill_chunk_fn(self.cfg)
    for c in range(n_chunks):
      part = slice(c * self.chunk, (c + 1) * self.chunk)
      logits, row = prefill(self.params, row, padded[None, part], mask[None, part], k=k)
    first = engine.first_token_fn()(logits, RowSampling.of([sampling]).tree())
    self._cache = engine.insert_fn()(self._cache, row, np.int32(slot))
    for name in ("temperature_B", "top_p_B", "top_k_B", "seed_B"):
      getattr(self._samp, name)[slot] = getattr(RowSampling.of([sampling]), name)[0]
    return int(jax.device_get(first)[0])

  def _decode(self, k: int, slots: list[int]) -> np.ndarray:
    """[B, steps_per_call] next tokens of every row (only `slots` are meaningful)."""
    active = np.zeros(self.max_batch, bool)
    active[slots] = True
    tok, self._cache = engine.decode_step_fn(self.cfg)(self.params, self._cache, self._last_tok, active,
                                                       self._step, self._samp.tree(), k=k,
                                                       n_steps=self.steps_per_call)
    return np.asarray(jax.device_get(tok))

  # ------------------------------------------------------------------------------------- engine loop

  def _notify(self) -> None:
    with self._cond:
      self._cond.notify_all()

  def _emit(self, request: _Request, event: Event) -> None:
    try:
      request.listener(event)
    except Exception:  # a broken listener (e.g. a closed connection) must not stop the engine
      log.exception("listener of request %d failed; cancelling it", request.id)
      request.cancelled = True

  def _finish(self, request: _Request, reason: str) -> None:
    if not request.finished:
      request.finished = True
      self._emit(request, Event(None, reason))

  def _free(self, slot: int, reason: str) -> None:
    request = self._slots[slot]
    self._slots[slot] = None
    if request is not None:
      self._finish(request, reason)

  def _accept_token(self, slot: int, token: int) -> None:
    """Hands one new token of the request in `slot` to its listener, or ends the request."""
    request = self._slots[slot]
    if token in self.eos_ids:
      self._free(slot, "stop")
      return
    request.generated += 1
    self._emit(request, Event(token, None))
    self._last_tok[slot], self._step[slot] = token, request.generated
    if request.generated >= request.sampling.max_new_tokens:
      self._free(slot, "length")

  def _admit(self) -> None:
    while True:
      with self._cond:
        free = [s for s, r in enumerate(self._slots) if r is None]
        if not free or not self._waiting:
          return
        request = self._waiting.popleft()
      if request.cancelled:
        self._finish(request, "cancelled")
        continue
      slot = free[0]
      self._slots[slot] = request
      try:
        first = self._prefill_into_slot(request.prompt, request.k, request.sampling, slot)
      except Exception:
        log.exception("prefill of request %d failed", request.id)
        self._free(slot, "error")
        continue
      self._accept_token(slot, first)

  def _iteration(self) -> None:
    with self._cond:  # cancelled requests leave the queue at once, not when a slot frees up
      dropped = [r for r in self._waiting if r.cancelled]
      self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
    for request in dropped:
      self._finish(request, "cancelled")
    for slot, request in enumerate(self._slots):
      if request is not None and request.cancelled:
        self._free(slot, "cancelled")
    self._admit()
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for slot, request in enumerate(self._slots):
      if request is not None:
        groups[request.k].append(slot)
    for k, slots in sorted(groups.items()):
      try:
        tokens = self._decode(k, slots)
      except Exception:
        # The donated cache may be gone with the failed call: every request holding a slot ends, not only k's.
        log.exception("decode step at k=%d failed; ending the %d requests holding slots", k, self.num_active)
        for slot, request in enumerate(self._slots):
          if request is not None:
            self._free(slot, "error")
        self._reset_device_state()
        return
      for slot in slots:  # tokens past a row's end (EOS, length, cancel) within a call are dropped
        for token in tokens[slot]:
          if self._slots[slot] is None or self._slots[slot].cancelled:
            break
          self._accept_token(slot, int(token))

  def _run(self) -> None:
    while True:
      with self._cond:
        while not self._waiting and self.num_active == 0 and not self._stop:
          self._cond.wait()
        if self._stop and not self._waiting and self.num_active == 0:
          return
      self._iteration()
