"""The OpenAI-compatible server over real HTTP on 127.0.0.1: the `openai` client, streaming, per-request k, every
bad input, concurrency, disconnects, the queue limit, SIGTERM on a real `python -m phds_jax.serve`, the Pareto
profile CLI and the load benchmark. The model is the shipped demo checkpoint in float32 with small max_len and
two offered ks, served by the real Scheduler; greedy outputs are held to `engine.generate`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from absl import flags

from benchmarks import serve_load
from phds_jax import hf
from phds_jax.data.tokenize import ChatTokenizer
from phds_jax.serve import profile as profile_lib
from phds_jax.serve.app import KPolicy, create_app
from phds_jax.serve.engine import generate
from phds_jax.serve.sampling import SamplingParams
from phds_jax.serve.scheduler import QueueFull, Scheduler
from phds_jax.serve.text import TextStream

DEMO = Path(__file__).resolve().parent.parent / "phds_jax" / "assets" / "demo_base"
MODEL = "demo"
KS = (1, 2)
MAX_LEN = 128
MAX_BATCH = 2
MAX_QUEUE = 6  # a burst of up to MAX_QUEUE requests is never refused, however the engine admits them
PROFILE = {1: 2.0, 2: 4.0}  # ms/token at batch 1: what a pareto.json would give the k chooser
WAIT_S = 30  # bound on every poll loop


@contextlib.contextmanager
def running(app) -> Iterator[str]:
  """Serves `app` with uvicorn on 127.0.0.1 (a socket bound to a free port first: no race); yields its URL."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  try:
    deadline = time.monotonic() + WAIT_S
    while not server.started:
      assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
      time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(WAIT_S)
    sock.close()


@pytest.fixture(scope="module")
def model():
  cfg, params = hf.load(DEMO, dtype="float32")
  return cfg.replace(dtype="float32"), params, ChatTokenizer.from_dir(str(DEMO))


@pytest.fixture(scope="module")
def served(model):
  """(url, scheduler): the app with a latency profile over one warmed-up scheduler."""
  cfg, params, tok = model
  scheduler = Scheduler(cfg, params, ks=KS, max_batch=MAX_BATCH, max_len=MAX_LEN, max_queue=MAX_QUEUE,
                        eos_ids=(tok.eos_id,))
  scheduler.warmup()
  scheduler.start()
  try:
    app = create_app(scheduler, tok, model_name=MODEL, k_pre=cfg.k_pre, default_k=2, profile=PROFILE)
    with running(app) as url:
      yield url, scheduler
  finally:
    scheduler.shutdown(drain=False, timeout=WAIT_S)


@pytest.fixture
def client(served) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def post(url: str, path: str, body, raw: bool = False) -> httpx.Response:
  content = body if raw else json.dumps(body)
  return httpx.post(f"{url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=60)


def wait_until(predicate, what: str) -> None:
  deadline = time.monotonic() + WAIT_S
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


@contextlib.contextmanager
def engine_paused(scheduler: Scheduler) -> Iterator[None]:
  """Holds the engine thread still (a request whose listener blocks on its first token), so that what waits in
  the queue stays there for as long as a test needs: no race with the decode speed of the machine."""
  blocked, release = threading.Event(), threading.Event()

  def listener(event) -> None:
    if event.token is not None and not release.is_set():
      blocked.set()
      release.wait(WAIT_S)

  handle = scheduler.submit([5, 6, 7], k=1, sampling=SamplingParams(max_new_tokens=8), listener=listener)
  try:
    assert blocked.wait(WAIT_S), "the engine never reached the blocking request"
    yield
  finally:
    release.set()
    handle.cancel()


def idle(url: str) -> bool:
  health = httpx.get(f"{url}/health", timeout=10).json()
  return health["running"] == 0 and health["queued"] == 0


# ------------------------------------------------------------------------------------------ happy paths


def test_models_and_health(served):
  url, _ = served
  models = httpx.get(f"{url}/v1/models").json()
  card = models["data"][0]
  assert (card["id"], card["ks"], card["k_pre"], card["default_k"]) == (MODEL, list(KS), 4, 2)
  assert card["ms_per_token_p50_batch1"] == {"1": 2.0, "2": 4.0}
  health = httpx.get(f"{url}/health").json()
  assert health["status"] == "ok" and health["ks"] == list(KS)


def test_greedy_over_http_equals_generate(served, client, model):
  """Completion and chat at each k, token for token equal to the batch engine at that k."""
  cfg, params, tok = model
  messages = [{"role": "user", "content": "Complete: Return the number of"}]
  chat_ids = tok.tokenizer.encode(tok.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
  prompt = "def add(a, b):"
  prompt_ids = tok.tokenizer.encode(prompt, add_special_tokens=False).ids
  outputs = {}
  for k in KS:
    want = generate(cfg, params, [prompt_ids, chat_ids], k=k, sampling=SamplingParams(max_new_tokens=12),
                    eos_ids=(tok.eos_id,), max_len=MAX_LEN)
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                      extra_body={"k": k, "return_token_ids": True})
    assert raw.headers["x-phds-k"] == str(k)
    completion = raw.parse()
    extra = completion.model_extra
    assert (extra["k"], extra["k_reason"]) == (k, "requested")
    choice = completion.choices[0]
    assert choice.model_extra["token_ids"] == want[0]
    assert choice.text == tok.tokenizer.decode(want[0], skip_special_tokens=True)
    assert choice.finish_reason == ("length" if len(want[0]) == 12 else "stop")
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(want[0])
    assert completion.usage.total_tokens == len(prompt_ids) + len(want[0])

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=12,
                                                           temperature=0, extra_body={"k": k})
    assert raw.headers["x-phds-k"] == str(k)
    reply = raw.parse()
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == tok.tokenizer.decode(want[1], skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(chat_ids) and reply.model_extra["k"] == k
    outputs[k] = want
  assert outputs[1] != outputs[2], "k=1 and k=2 generate the same tokens: the test cannot tell k apart"


def test_default_k_and_token_id_prompts(served, client, model):
  _, _, tok = model
  ids = tok.tokenizer.encode("class Queue:", add_special_tokens=False).ids
  by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
  by_text = client.completions.create(model=MODEL, prompt="class Queue:", max_tokens=6, temperature=0)
  assert by_ids.model_extra["k"] == 2 and by_ids.model_extra["k_reason"] == "default"
  assert by_ids.choices[0].text == by_text.choices[0].text
  both = client.completions.create(model=MODEL, prompt=["class Queue:", "def add(a, b):"], max_tokens=6,
                                   temperature=0)
  assert [c.index for c in both.choices] == [0, 1]
  assert both.choices[0].text == by_text.choices[0].text


def test_streaming_matches_non_streaming(served, client):
  url, _ = served
  kw = dict(model=MODEL, prompt="def add(a, b):", max_tokens=10, temperature=0, extra_body={"k": 1})
  whole = client.completions.create(**kw)
  pieces, usage, ks, finish = [], None, set(), None
  for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
    ks.add(chunk.model_extra["k"])
    usage = chunk.usage or usage
    for c in chunk.choices:
      pieces.append(c.text)
      finish = c.finish_reason or finish
  assert "".join(pieces) == whole.choices[0].text
  assert ks == {1} and finish == whole.choices[0].finish_reason
  assert usage.completion_tokens == whole.usage.completion_tokens

  messages = [{"role": "user", "content": "Complete: The advantage of"}]
  chat_kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0)
  reply = client.chat.completions.create(**chat_kw)
  chunks = list(client.chat.completions.create(**chat_kw, stream=True))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

  # The wire format: SSE data lines ending with [DONE], and the k header on the stream.
  with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True, "k": 1},
                    timeout=60) as response:
    assert response.headers["x-phds-k"] == "1"
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
  assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_nothing_compiles_while_serving(served, client):
  """After warm-up, requests of every offered k, short and multi-chunk prompts, greedy and sampled, streamed
  or not, run without a single backend compilation."""
  import jax  # pylint: disable=g-import-not-at-top
  compiles = []

  def listener(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for k in KS:
      for prompt in ("x", "word " * 70):  # one token; more than one prefill chunk
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, extra_body={"k": k})
      client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0.7, top_p=0.5, seed=1,
                                extra_body={"k": k, "top_k": 5})
      list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          stream=True, extra_body={"k": k}))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, f"{len(compiles)} compilation(s) while serving"


def test_sampling_is_seeded(served, client):
  kw = dict(model=MODEL, prompt="import os\n", max_tokens=12, temperature=1.0, top_p=0.9)
  a = client.completions.create(**kw, seed=3).choices[0].text
  assert client.completions.create(**kw, seed=3).choices[0].text == a
  others = {client.completions.create(**kw, seed=s).choices[0].text for s in (4, 5, 6)}
  assert others != {a}, "three other seeds all drew the same text: sampling ignores the seed"


def test_stop_strings(served, client):
  kw = dict(model=MODEL, prompt="def add(a, b):", max_tokens=24, temperature=0, extra_body={"k": 2})
  full = client.completions.create(**kw)
  text = full.choices[0].text
  stop = text[len(text) // 2:len(text) // 2 + 3]
  cut = text[:text.find(stop)]
  stopped = client.completions.create(**kw, stop=[stop, "never appears"])
  assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
  assert stopped.usage.completion_tokens < full.usage.completion_tokens
  streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True)
                     if c.choices)
  assert streamed == cut


def test_text_stream_holds_back_partial_stop_strings(model):
  _, _, tok = model
  ids = tok.tokenizer.encode("ab cd ef gh", add_special_tokens=False).ids
  stream = TextStream(tok.tokenizer, stop=[" ef g", "zz"])
  released = "".join(stream.push(t) for t in ids)
  assert released == "ab cd" and stream.stopped and stream.finish() == ""
  stream = TextStream(tok.tokenizer, stop=[" ef x"])
  released = "".join(stream.push(t) for t in ids) + stream.finish()
  assert released == "ab cd ef gh" and not stream.stopped


# ----------------------------------------------------------------------------------------- choosing k


def test_latency_budget_chooses_k(served, client):
  for budget, k, reason in ((10.0, 2, "latency_budget"), (3.0, 1, "latency_budget"),
                            (0.5, 1, "latency_budget_unmet")):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=2, temperature=0,
                                                      extra_body={"latency_budget_ms": budget})
    body = raw.parse().model_extra
    assert (raw.headers["x-phds-k"], body["k"], body["k_reason"]) == (str(k), k, reason)
  url, _ = served
  both = post(url, "/v1/completions", {"prompt": "x", "k": 1, "latency_budget_ms": 5})
  assert both.status_code == 400 and both.json()["error"]["param"] == "latency_budget_ms"


def test_latency_budget_without_profile_is_400(served, model):
  cfg, _, tok = model
  _, scheduler = served
  app = create_app(scheduler, tok, model_name=MODEL, k_pre=cfg.k_pre, shutdown_scheduler=False)
  with running(app) as url:
    response = post(url, "/v1/completions", {"prompt": "x", "latency_budget_ms": 50})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "latency_budget_ms"
    assert "profile" in response.json()["error"]["message"]


def test_k_policy_rejects_inconsistent_setups():
  with pytest.raises(ValueError, match="default_k"):
    KPolicy(4, (1, 2), 4)
  with pytest.raises(ValueError, match="within"):
    KPolicy(4, (0, 2), 2)
  with pytest.raises(ValueError, match="profile"):
    KPolicy(4, (1, 2), 2, profile={3: 1.0})


# ------------------------------------------------------------------------------------------- bad input

LONG = [5] * (MAX_LEN + 10)

BAD = [
    ("/v1/completions", {"prompt": "x", "k": 0}, "k"),
    ("/v1/completions", {"prompt": "x", "k": 5}, "k"),  # outside [1, k_pre=4]
    ("/v1/completions", {"prompt": "x", "k": 3}, "k"),  # within k_pre but not offered
    ("/v1/completions", {"prompt": "x", "k": "2"}, "k"),
    ("/v1/completions", {"prompt": "x", "k": True}, "k"),
    ("/v1/completions", {"prompt": "x", "k": 1.5}, "k"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_LEN}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": -1, "temperature": 0.5}, "seed"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "latency_budget_ms": -3}, "latency_budget_ms"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": 7}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, "prompt"),  # outside the vocabulary
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"prompt": LONG}, "prompt"),  # longer than --max_len
    ("/v1/completions", {"prompt": "word " * MAX_LEN}, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * MAX_LEN}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "k": 9}, "k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
     "max_completion_tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(served, path, body, param):
  url, _ = served
  response = post(url, path, body)
  assert response.status_code == 400, response.text
  error = response.json()["error"]
  assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
  assert error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_bodies_are_400(served, content):
  url, _ = served
  response = post(url, "/v1/completions", content, raw=True)
  assert response.status_code == 400, response.text
  assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_and_route_are_404(served, client):
  url, _ = served
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="other-model", prompt="x", max_tokens=2)
  assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
  assert httpx.get(f"{url}/v1/models/other-model").status_code == 404
  missing = httpx.get(f"{url}/v1/nothing-here")
  assert missing.status_code == 404 and "error" in missing.json()


def test_bad_input_does_not_disturb_other_requests(served, client):
  """A request in flight finishes unharmed while bad requests hit the server; it still serves afterwards."""
  url, _ = served
  results = {}

  def good():
    results["good"] = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=40,
                                                temperature=0, extra_body={"k": 1})

  thread = threading.Thread(target=good)
  thread.start()
  for path, body, _ in BAD[:12]:
    assert post(url, path, body).status_code == 400
  assert post(url, "/v1/completions", b"{", raw=True).status_code == 400
  thread.join(WAIT_S)
  assert results["good"].choices[0].finish_reason in ("length", "stop")
  assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text is not None


# ------------------------------------------------------------------------------ load, queue, disconnects


def test_concurrent_clients_at_mixed_k(served, client):
  """MAX_QUEUE clients at once (3x the slots, k alternating): all answered, each equal to its request alone."""
  prompts = ["def add(a, b):", "class Queue:", "import os\n", "Return the number of", "The quick brown", "Raise"]
  jobs = [(p, 1 + i % 2) for i, p in enumerate(prompts[:MAX_QUEUE])]
  request = lambda job: dict(model=MODEL, prompt=job[0], max_tokens=16, temperature=0, extra_body={"k": job[1]})
  alone = {job: client.completions.create(**request(job)).choices[0].text for job in jobs}
  results: dict = {}
  barrier = threading.Barrier(len(jobs))

  def worker(job):
    barrier.wait(WAIT_S)
    raw = client.completions.with_raw_response.create(**request(job))
    results[job] = (raw.headers["x-phds-k"], raw.parse().choices[0].text)

  threads = [threading.Thread(target=worker, args=(job,)) for job in jobs]
  for t in threads:
    t.start()
  for t in threads:
    t.join(WAIT_S * 2)
  assert len(results) == len(jobs), f"lost requests: {set(jobs) - set(results)}"
  for job in jobs:
    assert results[job] == (str(job[1]), alone[job]), job


def test_queue_full_is_429_with_retry_after(served):
  url, scheduler = served
  wait_until(lambda: idle(url), "an idle server")
  handles = []
  try:
    with engine_paused(scheduler):
      with pytest.raises(QueueFull):
        # The paused request holds one slot; the free ones admit at the next step, then the queue fills.
        for _ in range(MAX_BATCH - 1 + MAX_QUEUE + 1):
          handles.append(scheduler.submit([5, 6, 7], k=1, sampling=SamplingParams(max_new_tokens=4),
                                          listener=lambda event: None))
      assert len(handles) == MAX_BATCH - 1 + MAX_QUEUE
      response = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
      assert response.status_code == 429, response.text
      assert int(response.headers["retry-after"]) >= 1
      assert response.json()["error"]["code"] == "queue_full"
  finally:
    for handle in handles:
      handle.cancel()
  wait_until(lambda: idle(url), "the cancelled requests to leave")
  assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200


def wait_for_disconnect(url: str, before: dict) -> None:
  wait_until(lambda: httpx.get(f"{url}/health").json()["disconnects"] == before["disconnects"] + 1,
             "the server to notice the disconnect")


def assert_ended_cancelled(url: str, before: dict) -> None:
  """One more request ended as cancelled since `before` (a /health snapshot), and none more by its length."""
  finished = lambda reason: httpx.get(f"{url}/health").json()["finished"].get(reason, 0)
  wait_until(lambda: finished("cancelled") == before["finished"].get("cancelled", 0) + 1,
             "the scheduler's cancelled event")
  assert finished("length") == before["finished"].get("length", 0)


def test_disconnect_mid_stream_frees_the_slot(served):
  url, scheduler = served
  wait_until(lambda: idle(url), "an idle server")
  before = httpx.get(f"{url}/health").json()
  with contextlib.ExitStack() as paused:
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": "x", "max_tokens": MAX_LEN - 8, "stream": True, "k": 2}) as response:
      for line in response.iter_lines():
        if line.startswith("data: {"):
          break  # a token arrived: the request holds a slot. Hold the engine (so it cannot run to its end), hang up
      paused.enter_context(engine_paused(scheduler))
    wait_for_disconnect(url, before)
  wait_until(lambda: idle(url), "the slot to be freed")
  assert_ended_cancelled(url, before)  # by the scheduler, not by running to max_tokens
  assert scheduler.num_active == 0


def test_disconnect_while_queued_cancels_the_request(served):
  """A non-streaming client that gives up while its request waits: the server notices (it polls for the
  disconnect) and cancels it in the scheduler, which ends it without generating anything."""
  url, scheduler = served
  wait_until(lambda: idle(url), "an idle server")
  before = httpx.get(f"{url}/health").json()
  with engine_paused(scheduler):
    with pytest.raises(httpx.ReadTimeout):
      httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=0.3)
    wait_for_disconnect(url, before)
  wait_until(lambda: idle(url), "an idle server")
  # /health counts the ends of HTTP requests only (not the direct submission that paused the engine).
  assert_ended_cancelled(url, before)


# ------------------------------------------------------------------------------ SIGTERM on a real process


def test_sigterm_finishes_in_flight_request_and_exits_0(tmp_path):
  """`python -m phds_jax.serve` (started by the load benchmark's helper): SIGTERM while a stream is running;
  the stream completes in full and the process exits 0."""
  args = serve_load.parse_args(["--ks=1", "--max_len=256", "--max_batch=2", "--dtype=float32"])
  port = serve_load.free_port()
  url = f"http://127.0.0.1:{port}"
  log_path = tmp_path / "server.log"
  with open(log_path, "w") as log:
    proc = serve_load.start_server(args, port, log)
    try:
      serve_load.wait_healthy(url, proc, timeout_s=240)
      events: list = []
      first = threading.Event()

      def stream():
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                          json={"prompt": "def add(a, b):", "max_tokens": 200, "k": 1, "stream": True,
                                "stream_options": {"include_usage": True}}) as response:
          for line in response.iter_lines():
            if line.startswith("data: "):
              events.append(line[6:])
              first.set()

      thread = threading.Thread(target=stream)
      thread.start()
      assert first.wait(WAIT_S), "no streamed token"
      at_sigterm = len(events)
      code = serve_load.stop_server(proc, timeout_s=120)  # SIGTERM, then wait for the exit
      thread.join(WAIT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert code == 0, log_path.read_text()[-3000:]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
  tokens = chunks[-1]["usage"]["completion_tokens"]
  # Ran to its end after the SIGTERM: all 200 tokens, or EOS (never "cancelled" or cut short).
  assert finish == ["length"] and tokens == 200 or finish == ["stop"] and tokens > 0, (finish, tokens)
  assert at_sigterm < len(events) - 2, "the stream had ended before the SIGTERM: nothing was in flight"
  assert "SIGTERM" in log_path.read_text()


def test_cli_usage_errors_are_one_line_before_compiling():
  result = subprocess.run([sys.executable, "-m", "phds_jax.serve", f"--checkpoint={DEMO}", "--ks=1,5"],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "k_pre=4" in result.stderr and "Traceback" not in result.stderr and "compiled k=" not in result.stderr


# ------------------------------------------------------------------------------------ profile, benchmark


def test_profile_cli_joins_eval_results(tmp_path, model, served):
  """The real evaluator's results.json joined with measured latencies. (Only for speed: the context length, the
  steps and the batch match the served scheduler's prefill chunk, cache length and slots, so most of what
  time_decode runs is already compiled.)"""
  from phds_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  cfg, params, tok = model
  eval_dir = tmp_path / "eval"
  results = evaluate(cfg, params, tok.tokenizer, [f"jsonl:{DEMO.parent / 'demo_sft' / 'mc_eval.jsonl'}"], ks=[1, 2],
                     limit=4, n_boot=10, out_dir=eval_dir, plots=False, progress=False)
  fv = profile_lib.define_flags(flags.FlagValues())
  out = tmp_path / "pareto.json"
  cache_len = served[1].cache_len
  fv(["profile", f"--checkpoint={DEMO}", f"--eval_results={eval_dir / 'results.json'}", f"--out={out}",
      "--ks=1,2", "--dtype=float32", f"--max_batch={MAX_BATCH}", f"--context_len={served[1].chunk}",
      f"--new_tokens={cache_len - served[1].chunk - 1}", "--repeats=1"])
  doc = profile_lib.run(fv)
  assert json.loads(out.read_text()) == doc
  assert [p["k"] for p in doc["points"]] == [1, 2]
  task = next(iter(results.summary["tasks"]))
  for p in doc["points"]:
    assert 0 < p["batch_1"]["p50_ms"] <= p["batch_1"]["p99_ms"]
    assert p["batch_max"]["batch_size"] == MAX_BATCH and p["batch_max"]["p50_ms"] > 0
    assert p["accuracy"] == pytest.approx(results.metric(task, p["k"]))
  assert doc["accuracy_source"]["metric"] == "primary"  # the MC average
  assert {"device_kind", "jax_version", "date"} <= set(doc["machine"])
  assert out.with_suffix(".png").stat().st_size > 1000
  assert profile_lib.load_profile(out) == {p["k"]: p["batch_1"]["p50_ms"] for p in doc["points"]}


def test_accuracy_by_k_picks_the_metric():
  summary = {"tasks": {"a": {"kind": "mc", "primary": "acc", "metrics": ["acc", "acc_norm"],
                             "by_k": {"1": {"acc": 0.5, "acc_norm": 0.6}, "2": {"acc": 0.7, "acc_norm": 0.8}}},
                       "b": {"kind": "ppl", "primary": "word_perplexity", "metrics": ["word_perplexity"],
                             "by_k": {"1": {"word_perplexity": 30.0}, "2": {"word_perplexity": 20.0}}}}}
  with pytest.raises(profile_lib.ProfileError, match="--task"):
    profile_lib.accuracy_by_k(summary)
  assert profile_lib.accuracy_by_k(summary, "a", "acc_norm")[0] == {1: 0.6, 2: 0.8}
  acc, source = profile_lib.accuracy_by_k(summary, "b")
  assert acc == {1: 30.0, 2: 20.0} and not source["higher_is_better"]
  points = [{"k": 1, "batch_1": {"p50_ms": 1.0}, "accuracy": 0.5}, {"k": 2, "batch_1": {"p50_ms": 2.0},
                                                                    "accuracy": 0.4},
            {"k": 3, "batch_1": {"p50_ms": 3.0}, "accuracy": 0.9}]
  assert profile_lib.pareto_optimal(points) == [True, False, True]


def test_load_profile_rejects_other_files(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text('{"points": [{"k": 1}]}')
  with pytest.raises(profile_lib.ProfileError, match="bad.json"):
    profile_lib.load_profile(bad)


def test_load_benchmark_smoke(served, tmp_path):
  url, _ = served
  wait_until(lambda: idle(url), "an idle server")
  out = tmp_path / "load.json"
  status = serve_load.main([f"--url={url}", "--clients=3", "--requests=2", "--ks=1,2", "--max_tokens=6",
                            "--duration_s=60", f"--out={out}"])
  summary = json.loads(out.read_text())
  assert status == 0 and summary["failed"] == 0 and summary["requests"] == 6
  for k in ("1", "2"):
    s = summary["per_k"][k]
    assert s["requests"] == s["ok"] == 3
    assert s["ttft_ms_p50"] > 0 and s["token_ms_p50"] > 0 and s["tokens_per_s"] > 0
