"""The OpenAI-compatible HTTP layer over a running `Scheduler`: FastAPI routes, k choice, text, errors.

    GET  /health                  liveness and queue depth
    GET  /v1/models               the one served model, with the ks it offers (and its latency profile)
    POST /v1/completions          prompt: str | [str] | [ids] | [[ids]]; one choice per prompt
    POST /v1/chat/completions     messages rendered with the checkpoint's chat template

The HTTP side only turns text into token ids and back; the scheduler's engine thread does all model work and
calls each request's listener from that thread, so events cross into asyncio with `call_soon_threadsafe`.
Every response names the k that served it (`k` in the body, `x-phds-k` header) and why (`k_reason`:
requested / default / latency_budget / latency_budget_unmet). Every 4xx/5xx carries OpenAI's error body.
Stop strings are found here, on the detokenized text: the text is cut before the stop string and the request is
cancelled in the scheduler, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import tokenizers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from phds_jax import kplan
from phds_jax.data import chat
from phds_jax.data.tokenize import ChatTokenizer
from phds_jax.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, SamplingFields,
                                     error_body, invalid)
from phds_jax.serve.sampling import SamplingParams
from phds_jax.serve.scheduler import Event, QueueFull, RequestError, ShuttingDown
from phds_jax.serve.text import TextStream

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
RETRY_AFTER_S = 1
_DISCONNECT_POLL_S = 0.5
# Scheduler field names -> the request field a client wrote.
_FIELD_NAMES = {"max_new_tokens": "max_tokens"}


# ------------------------------------------------------------------------------------------- choosing k


@dataclasses.dataclass(frozen=True)
class KPolicy:
  """Which k serves a request: the one it asks for, the one that fits its latency budget, or the default.

  `profile` maps k -> measured p50 ms per decoded token at batch 1 (pareto.json from `serve.profile`).
  """

  k_pre: int
  ks: tuple[int, ...]
  default_k: int
  profile: Mapping[int, float] | None = None

  def __post_init__(self):
    if not self.ks or kplan.ks_outside(self.ks, self.k_pre):
      raise ValueError(f"offered ks {list(self.ks)} must be non-empty and within [1, k_pre={self.k_pre}]")
    if self.default_k not in self.ks:
      raise ValueError(f"default_k {self.default_k} is not among the offered ks {list(self.ks)}")
    if self.profile is not None and not set(self.profile) & set(self.ks):
      raise ValueError(f"the latency profile covers k {sorted(self.profile)}, none of the offered ks "
                       f"{list(self.ks)}")

  def choose(self, k: int | None, latency_budget_ms: float | None) -> tuple[int, str, str]:
    """(k, reason code, one-sentence explanation); raises a 400 APIError naming the field."""
    if k is not None and latency_budget_ms is not None:
      raise invalid("latency_budget_ms", "give either k or latency_budget_ms, not both")
    if k is not None:
      if not 1 <= k <= self.k_pre:
        raise invalid("k", f"k={k} is outside [1, k_pre={self.k_pre}] for this checkpoint")
      if k not in self.ks:
        raise invalid("k", f"k={k} is not offered by this server (offered: {list(self.ks)})")
      return k, "requested", f"k={k} as requested"
    if latency_budget_ms is not None:
      if not self.profile:
        raise invalid("latency_budget_ms", "this server has no latency profile (start it with "
                      "--profile=pareto.json from `python -m phds_jax.serve.profile`); ask for a k instead")
      measured = {k: ms for k, ms in self.profile.items() if k in self.ks}
      fits = [k for k, ms in measured.items() if ms <= latency_budget_ms]
      if fits:
        k = max(fits)
        return k, "latency_budget", (f"k={k} is the largest offered k whose measured p50 ({measured[k]:.3g} ms "
                                     f"per token at batch 1) fits the budget of {latency_budget_ms:g} ms")
      k = min(self.ks)
      fastest = min(measured, key=measured.get)
      return k, "latency_budget_unmet", (f"no offered k fits {latency_budget_ms:g} ms per token (fastest: k="
                                         f"{fastest} at {measured[fastest]:.3g} ms); serving the smallest k={k}")
    return self.default_k, "default", f"the server's default k={self.default_k}"


# ------------------------------------------------------------------------------------ requests in flight


class _Disconnected(Exception):
  """The client of a non-streaming request went away."""


@dataclasses.dataclass
class _Choice:
  index: int
  prompt_ids: list[int]
  text: TextStream
  handle: Any = None
  finish_reason: str | None = None
  tokens: int = 0


class _Run:
  """The scheduler requests of one HTTP call (one per prompt) and their events, on the event loop."""

  def __init__(self, scheduler: Any, prompts: list[list[int]], stop: Sequence[str], tokenizer: tokenizers.Tokenizer,
               finished: collections.Counter):
    self.scheduler = scheduler
    self._finished = finished
    self.choices = [_Choice(i, ids, TextStream(tokenizer, stop)) for i, ids in enumerate(prompts)]
    self._events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

  def submit(self, k: int, sampling: SamplingParams, prompt_field: str) -> None:
    """Submits every prompt, or none: a refusal of one cancels the others and becomes an APIError."""
    loop = asyncio.get_running_loop()
    for choice in self.choices:
      def listener(event: Event, i: int = choice.index) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
          loop.call_soon_threadsafe(self._events.put_nowait, (i, event))
          if event.finish_reason is not None:  # counted even when nobody reads this request's events any more
            loop.call_soon_threadsafe(self._finished.update, [event.finish_reason])
      try:
        choice.handle = self.scheduler.submit(choice.prompt_ids, k=k, sampling=sampling, listener=listener)
      except Exception as e:
        self.cancel()
        raise _scheduler_error(e, prompt_field) from e

  def cancel(self) -> None:
    """Frees the slots of every request still running (a disconnect, or an error elsewhere)."""
    for choice in self.choices:
      if choice.handle is not None and choice.finish_reason is None:
        choice.handle.cancel()
        choice.finish_reason = "cancelled"

  @property
  def finished(self) -> bool:
    return all(c.finish_reason is not None for c in self.choices)

  async def deltas(self, request: Request | None = None) -> AsyncIterator[tuple[_Choice, str, str | None]]:
    """(choice, new text, finish reason or None) until every choice has finished. With `request`, polls for a
    disconnect while waiting (a streaming response is cancelled by Starlette instead)."""
    while not self.finished:
      i, event = await self._next_event(request)
      choice = self.choices[i]
      if choice.finish_reason is not None:  # tokens already in flight after a stop-string cancel
        continue
      if event.token is not None:
        choice.tokens += 1
        delta = choice.text.push(event.token)
        if choice.text.stopped:
          choice.handle.cancel()
          choice.finish_reason = "stop"
          yield choice, delta, "stop"
        elif delta:
          yield choice, delta, None
      else:
        choice.finish_reason = event.finish_reason
        yield choice, choice.text.finish(), event.finish_reason

  async def _next_event(self, request: Request | None) -> tuple[int, Event]:
    while True:
      try:
        return await asyncio.wait_for(self._events.get(), None if request is None else _DISCONNECT_POLL_S)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          raise _Disconnected() from None

  def usage(self) -> dict[str, int]:
    prompt = sum(len(c.prompt_ids) for c in self.choices)
    completion = sum(c.tokens for c in self.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _scheduler_error(e: Exception, prompt_field: str) -> APIError:
  if isinstance(e, RequestError):
    field = _FIELD_NAMES.get(e.field, e.field)
    return invalid(prompt_field if field == "prompt" else field, e.message)
  if isinstance(e, QueueFull):
    return APIError(429, f"the request queue is full ({e}); retry shortly", None, "rate_limit_error",
                    "queue_full", {"Retry-After": str(RETRY_AFTER_S)})
  if isinstance(e, ShuttingDown):
    return APIError(503, "the server is shutting down", None, "server_error", "shutting_down",
                    {"Retry-After": str(RETRY_AFTER_S)})
  return APIError(500, f"could not submit the request: {type(e).__name__}: {e}", None, "server_error")


# ---------------------------------------------------------------------------------------------- the app


@dataclasses.dataclass
class _Served:
  scheduler: Any
  tokenizer: ChatTokenizer
  model_name: str
  policy: KPolicy
  vocab_size: int
  max_len: int
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))
  # How the scheduler ended requests ("stop", "length", "cancelled", "error"), and streams whose client left.
  finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  disconnects: int = 0


def create_app(scheduler: Any, tokenizer: ChatTokenizer, *, model_name: str, k_pre: int,
               default_k: int | None = None, profile: Mapping[int, float] | None = None,
               vocab_size: int | None = None, shutdown_scheduler: bool = True,
               drain_timeout: float | None = None) -> FastAPI:
  """The FastAPI app serving a started (warmed-up) `scheduler`.

  `default_k` defaults to k_pre when offered, else the largest offered k. On shutdown (after uvicorn has let
  in-flight HTTP requests finish) the lifespan drains and joins the
  scheduler unless `shutdown_scheduler` is False. `vocab_size` bounds token-id prompts (default: the
  scheduler's model config).
  """
  ks = tuple(sorted(scheduler.ks))
  served = _Served(scheduler, tokenizer, model_name,
                   KPolicy(k_pre, ks, default_k or (k_pre if k_pre in ks else max(ks)), profile),
                   vocab_size or scheduler.cfg.vocab_size, scheduler.max_len)

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    if shutdown_scheduler:
      log.info("draining the scheduler (%d running, %d queued)", scheduler.num_active, scheduler.num_queued)
      await asyncio.to_thread(scheduler.shutdown, drain=True, timeout=drain_timeout)

  app = FastAPI(title="phds_jax", lifespan=lifespan)
  app.state.served = served
  _add_error_handlers(app)

  @app.get("/health")
  async def health() -> dict[str, Any]:
    return {"status": "ok", "model": model_name, "ks": list(ks), "running": scheduler.num_active,
            "queued": scheduler.num_queued, "finished": dict(served.finished), "disconnects": served.disconnects}

  @app.get("/v1/models")
  async def models() -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(served)]}

  @app.get("/v1/models/{model:path}")
  async def model(model: str) -> dict[str, Any]:
    _check_model(served, model)
    return _model_card(served)

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, request: Request):
    _check_common(served, body)
    for name, value, neutral in (("echo", body.echo, False), ("suffix", body.suffix, None)):
      if value != neutral:
        raise invalid(name, f"{name} is not supported")
    if body.best_of not in (None, 1):
      raise invalid("best_of", "best_of must be 1")
    prompts = _completion_prompts(served, body.prompt)
    return await _respond(served, body, request, prompts, "prompt", chat_mode=False,
                          max_tokens=body.max_tokens or DEFAULT_COMPLETION_TOKENS)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatCompletionRequest, request: Request):
    _check_common(served, body)
    if body.top_logprobs is not None:
      raise invalid("top_logprobs", "logprobs are not supported")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
      text = tokenizer.render(messages, add_generation_prompt=True)
    except chat.TemplateError as e:
      raise invalid("messages", str(e)) from e
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    max_tokens = body.max_completion_tokens or body.max_tokens or served.max_len - len(ids)
    if max_tokens < 1:
      raise invalid("messages", f"the rendered conversation is {len(ids)} tokens; this server's max_len is "
                    f"{served.max_len}")
    return await _respond(served, body, request, [ids], "messages", chat_mode=True, max_tokens=max_tokens)

  return app


def _model_card(served: _Served) -> dict[str, Any]:
  policy = served.policy
  card = {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "phds_jax",
          "k_pre": policy.k_pre, "ks": list(policy.ks), "default_k": policy.default_k, "max_len": served.max_len}
  if policy.profile:
    card["ms_per_token_p50_batch1"] = {str(k): ms for k, ms in sorted(policy.profile.items())}
  return card


def _check_model(served: _Served, model: str | None) -> None:
  if model is not None and model != served.model_name:
    raise APIError(404, f"the model {model!r} does not exist; this server serves {served.model_name!r}",
                   "model", code="model_not_found")


def _check_common(served: _Served, body: SamplingFields) -> None:
  """404 for another model; 400 for the OpenAI features we do not implement."""
  _check_model(served, body.model)
  if body.n != 1:
    raise invalid("n", f"n={body.n}: only n=1 is supported")
  if body.logprobs not in (None, False):
    raise invalid("logprobs", "logprobs are not supported")
  for name in ("presence_penalty", "frequency_penalty"):
    if getattr(body, name) != 0:
      raise invalid(name, f"{name} is not supported (must be 0)")
  if body.logit_bias:
    raise invalid("logit_bias", "logit_bias is not supported")


def _completion_prompts(served: _Served, prompt: Any) -> list[list[int]]:
  """Token ids of each prompt; text gets BOS when the tokenizer config asks for it."""
  if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
    texts = [prompt] if isinstance(prompt, str) else prompt
    bos = served.tokenizer.bos_id if served.tokenizer.text_bos else None
    prompts = [([bos] if bos is not None else []) + served.tokenizer.tokenizer.encode(t, add_special_tokens=False).ids
               for t in texts]
  elif prompt and all(isinstance(p, int) for p in prompt):
    prompts = [list(prompt)]
  else:
    prompts = [list(p) for p in prompt]
  if not prompts:
    raise invalid("prompt", "prompt must not be an empty list")
  for i, ids in enumerate(prompts):
    bad = [t for t in ids if not 0 <= t < served.vocab_size]
    if bad:
      raise invalid("prompt", f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})")
  return prompts


async def _respond(served: _Served, body: SamplingFields, request: Request, prompts: list[list[int]],
                   prompt_field: str, *, chat_mode: bool, max_tokens: int):
  k, reason, detail = served.policy.choose(body.k, body.latency_budget_ms)
  for i, ids in enumerate(prompts):
    if not ids:
      raise invalid(prompt_field, f"prompt {i} is empty")
    if len(ids) >= served.max_len:
      raise invalid(prompt_field, f"prompt {i} is {len(ids)} tokens; this server's max_len is {served.max_len}")
    if len(ids) + max_tokens > served.max_len:
      raise invalid("max_tokens", f"prompt {i} ({len(ids)} tokens) + max_tokens {max_tokens} exceed this "
                    f"server's max_len {served.max_len}")
  seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
  sampling = SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            top_k=body.top_k, seed=seed)
  try:
    sampling.validate()
  except ValueError as e:
    field = str(e).split(" ", 1)[0]
    raise invalid(_FIELD_NAMES.get(field, field), str(e)) from e
  stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
  run = _Run(served.scheduler, prompts, stop, served.tokenizer.tokenizer, served.finished)
  run.submit(k, sampling, prompt_field)
  meta = {"id": f"{'chatcmpl' if chat_mode else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
          "model": served.model_name}
  extra = {"k": k, "k_reason": reason, "k_detail": detail}
  headers = {"x-phds-k": str(k), "x-phds-k-reason": reason}
  log.info("%s: k=%d (%s), %d prompt(s), %d prompt tokens, max_tokens %d, stream=%s", meta["id"], k, reason,
           len(prompts), sum(map(len, prompts)), max_tokens, body.stream)
  if body.stream:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(served, run, meta, extra, chat_mode, include_usage),
                             media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})
  try:
    async for _ in run.deltas(request):
      pass
  except _Disconnected:
    log.info("%s: client disconnected; cancelled", meta["id"])
    served.disconnects += 1
    run.cancel()
    raise APIError(499, "client disconnected", None, "client_error") from None
  finally:
    run.cancel()
  if any(c.finish_reason in ("error", "cancelled") for c in run.choices):
    reasons = sorted({c.finish_reason for c in run.choices if c.finish_reason in ("error", "cancelled")})
    raise APIError(500 if "error" in reasons else 503, f"generation ended with {reasons[0]!r}", None,
                   "server_error")
  choices = []
  for c in run.choices:
    choice: dict[str, Any] = {"index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
    if chat_mode:
      choice["message"] = {"role": "assistant", "content": c.text.text}
    else:
      choice["text"] = c.text.text
    if body.return_token_ids:
      choice["token_ids"] = list(c.text.ids)
    choices.append(choice)
  content = {**meta, "object": "chat.completion" if chat_mode else "text_completion", "choices": choices,
             "usage": run.usage(), **extra}
  log.info("%s: done, %s", meta["id"], content["usage"])
  return JSONResponse(content, headers=headers)


async def _stream(served: _Served, run: _Run, meta: dict[str, Any], extra: dict[str, Any], chat_mode: bool,
                  include_usage: bool) -> AsyncIterator[str]:
  """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. If the client goes away,
  Starlette cancels this generator and `finally` frees the requests' slots."""
  obj = "chat.completion.chunk" if chat_mode else "text_completion"

  def chunk(choices: list[dict[str, Any]], **more: Any) -> str:
    return f"data: {json.dumps({**meta, 'object': obj, 'choices': choices, **extra, **more})}\n\n"

  def choice(index: int, text: str | None, finish_reason: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
    if chat_mode:
      out["delta"] = {} if text is None else {"content": text}
    else:
      out["text"] = text or ""
    return out

  try:
    if chat_mode:
      yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for c in run.choices])
    async for c, delta, finish_reason in run.deltas():
      if finish_reason == "error":
        yield f"data: {json.dumps(error_body('generation failed in the engine', None, 'server_error'))}\n\n"
      if delta:
        yield chunk([choice(c.index, delta, None)])
      if finish_reason is not None:
        yield chunk([choice(c.index, None if chat_mode else "", finish_reason)])
    if include_usage:
      yield chunk([], usage=run.usage())
    yield "data: [DONE]\n\n"
    log.info("%s: done (streamed), %s", meta["id"], run.usage())
  finally:
    if not run.finished:
      log.info("%s: stream closed early (client disconnected?); cancelling", meta["id"])
      served.disconnects += 1
    run.cancel()


# ------------------------------------------------------------------------------------------------ errors


def _add_error_handlers(app: FastAPI) -> None:
  """One OpenAI error body for every failure; FastAPI's 422 validation errors become 400s naming the field."""

  @app.exception_handler(APIError)
  async def api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    errors = list(e.errors())
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
      return JSONResponse(error_body(f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}"),
                          status_code=400)
    loc = [str(part) for part in first["loc"]]
    param = loc[1] if len(loc) > 1 and loc[0] == "body" else None
    same = [err for err in errors if [str(p) for p in err["loc"]][:2] == loc[:2]]
    detail = "; ".join(dict.fromkeys(f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in same[:4]))
    message = f"invalid value for '{param}': {detail}" if param else f"invalid request body: {first['msg']}"
    return JSONResponse(error_body(message, param), status_code=400)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(e.detail), None, type_), status_code=e.status_code, headers=e.headers)

  @app.exception_handler(Exception)
  async def unexpected(_: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", None, "server_error"),
                        status_code=500)
