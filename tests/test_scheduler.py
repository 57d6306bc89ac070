"""Continuous batching: per-k groups over shared slots give exactly what batch generation gives, requests join
and leave between steps, nothing compiles after warm-up, and bad requests are refused before queueing."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest

from phds_jax import models
from phds_jax.serve import engine
from phds_jax.serve.sampling import SamplingParams
from phds_jax.serve.scheduler import Event, QueueFull, RequestError, Scheduler, ShuttingDown


@pytest.fixture(scope="module")
def model():
  cfg = models.tiny("qwen2_moe", max_position_embeddings=64)
  return cfg, models.init_params(cfg, jax.random.PRNGKey(4))


class Collector:
  """A listener that records one request's events and signals its end."""

  def __init__(self):
    self.tokens: list[int] = []
    self.reason: str | None = None
    self.done = threading.Event()

  def __call__(self, event: Event) -> None:
    assert not self.done.is_set(), "event after the finish event"
    if event.finish_reason is None:
      self.tokens.append(event.token)
    else:
      self.reason = event.finish_reason
      self.done.set()


def _compiled(cfg) -> int:
  fns = (engine.prefill_chunk_fn(cfg), engine.decode_step_fn(cfg), engine.insert_fn(), engine.first_token_fn())
  return sum(f._cache_size() for f in fns)


def test_mixed_k_stream_equals_batch_generation_and_never_compiles_after_warmup(model):
  """Two tokens per decode call: EOS/length inside a call drop the rest of that row's tokens."""
  cfg, params = model
  rng = np.random.default_rng(1)
  jobs = []  # (prompt, k, sampling): more requests than slots, mixed k, greedy and seeded sampling
  for i in range(7):
    prompt = rng.integers(3, cfg.vocab_size, int(rng.integers(2, 12))).tolist()
    sampling = SamplingParams(max_new_tokens=int(rng.integers(1, 7)), temperature=1.0 if i % 3 == 0 else 0.0,
                              top_p=0.9, seed=i)
    jobs.append((prompt, (1, 2, 4)[i % 3], sampling))
  sched = Scheduler(cfg, params, ks=(1, 2, 4), max_batch=3, max_len=32, prefill_chunk=8, steps_per_call=2)
  sched.warmup()
  compiled = _compiled(cfg)
  sched.start()
  results = [Collector() for _ in jobs]
  for (prompt, k, sampling), listener in zip(jobs, results):
    sched.submit(prompt, k=k, sampling=sampling, listener=listener)
  for r in results:
    assert r.done.wait(120)
  sched.shutdown()
  assert _compiled(cfg) == compiled
  for k in (1, 2, 4):  # one batch per k: rows are independent of their batch (see test_generate)
    mine = [(job, r) for job, r in zip(jobs, results) if job[1] == k]
    expected = engine.generate(cfg, params, [j[0] for j, _ in mine], k=k, sampling=[j[2] for j, _ in mine])
    for (job, r), want in zip(mine, expected):
      assert r.reason == "length" and r.tokens == want, job


def test_eos_cancel_and_shutdown(model):
  cfg, params = model
  prompt = [5, 6, 7]
  free_run = engine.generate(cfg, params, [prompt], k=2, sampling=SamplingParams(max_new_tokens=6))[0]
  eos = free_run[2]
  sched = Scheduler(cfg, params, ks=(2,), max_batch=2, max_len=48, eos_ids=(eos,))
  sched.start()
  stopped = Collector()
  sched.submit(prompt, k=2, sampling=SamplingParams(max_new_tokens=6), listener=stopped)
  assert stopped.done.wait(60)
  assert stopped.reason == "stop" and stopped.tokens == free_run[:free_run.index(eos)]

  long = Collector()
  handle = sched.submit([9, 10], k=2, sampling=SamplingParams(max_new_tokens=40), listener=long)
  handle.cancel()
  assert long.done.wait(60) and long.reason == "cancelled" and len(long.tokens) < 40
  assert sched.num_active == 0

  busy = [Collector() for _ in range(2)]  # both slots taken, so the next request waits in the queue
  busy_handles = [sched.submit([9, 10], k=2, sampling=SamplingParams(max_new_tokens=40), listener=c) for c in busy]
  queued = Collector()
  sched.submit([13], k=2, sampling=SamplingParams(max_new_tokens=2), listener=queued).cancel()
  assert queued.done.wait(60) and queued.reason == "cancelled" and not queued.tokens
  assert not all(c.done.is_set() for c in busy)  # it left the queue while the slots were still busy
  for h in busy_handles:
    h.cancel()

  in_flight = Collector()
  sched.submit([11, 12], k=2, sampling=SamplingParams(max_new_tokens=20), listener=in_flight)
  sched.shutdown(drain=True, timeout=60)
  assert in_flight.reason == "length" and len(in_flight.tokens) == 20
  with pytest.raises(ShuttingDown):
    sched.submit([1], k=2, sampling=SamplingParams(), listener=Collector())


def test_bad_requests_are_refused_before_queueing(model):
  cfg, params = model
  sched = Scheduler(cfg, params, ks=(1, 3), max_batch=1, max_len=16, max_queue=1)
  ok = SamplingParams(max_new_tokens=4)
  cases = [(dict(prompt=[1], k=2, sampling=ok), "k"), (dict(prompt=[1], k=True, sampling=ok), "k"),
           (dict(prompt=[], k=1, sampling=ok), "prompt"), (dict(prompt=[1, 10_000], k=1, sampling=ok), "prompt"),
           (dict(prompt=[1] * 16, k=1, sampling=ok), "prompt"),
           (dict(prompt=[1] * 14, k=1, sampling=ok), "max_tokens"),
           (dict(prompt=[1], k=1, sampling=SamplingParams(temperature=-1.0)), "temperature")]
  for kwargs, field in cases:
    with pytest.raises(RequestError) as err:
      sched.submit(listener=Collector(), **kwargs)
    assert err.value.field == field, kwargs
  for _ in range(2):  # not started: one request for the free slot, one for the queue
    sched.submit([1], k=1, sampling=ok, listener=Collector())
  with pytest.raises(QueueFull):
    sched.submit([1], k=1, sampling=ok, listener=Collector())
  with pytest.raises(ValueError, match="out of range"):
    Scheduler(cfg, params, ks=(0,))
