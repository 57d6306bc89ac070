r"""Load on the OpenAI-compatible server: N concurrent streaming clients at mixed k, over loopback.

    python -m benchmarks.serve_load                                        # demo checkpoint, own server
    python -m benchmarks.serve_load --clients=16 --requests=8 --ks=1,2,3,4 --max_tokens=64
    python -m benchmarks.serve_load --url=http://127.0.0.1:8000            # an already running server

Without --url it starts `python -m phds_jax.serve` on 127.0.0.1 (a free port) with --checkpoint, waits for it
to compile, runs the load, then stops it with SIGTERM and checks that it exits 0. Each client (a thread with
its own `openai.OpenAI`) sends --requests streaming completions in turn, cycling through --ks; everything is
bounded (--duration_s for the load, --request_timeout_s per request), so the run ends by itself.

Reports per k: requests, time to first token (p50/p99), per-token latency (gaps between streamed tokens,
p50/p99), decode tokens/s per request (p50) and the k's aggregate tokens/s over the load's wall time. Exits 1 if
any request failed, was lost (stream ended without a finish reason), was served at another k than asked, or
if the server did not exit 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai

DEMO = Path(__file__).resolve().parent.parent / "phds_jax" / "assets" / "demo_base"
PROMPTS = ("def add(a, b):", "Return the number of", "class Queue:", "The quick brown fox", "import os\n",
           "Raise ValueError if")


@dataclasses.dataclass
class Result:
  client: int
  k: int
  ok: bool = False
  served_k: int | None = None
  finish_reason: str | None = None
  tokens: int = 0
  ttft_s: float | None = None
  total_s: float | None = None
  gaps_s: list[float] = dataclasses.field(default_factory=list)
  error: str | None = None


def one_request(client: openai.OpenAI, model: str, client_id: int, k: int, prompt: str, max_tokens: int,
                seed: int) -> Result:
  """One streaming completion at `k`; timings from the arrival of each streamed chunk."""
  result = Result(client_id, k)
  start = last = time.perf_counter()
  try:
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.8, seed=seed,
                                       stream=True, stream_options={"include_usage": True}, extra_body={"k": k})
    for chunk in stream:
      now = time.perf_counter()
      extra = chunk.model_extra or {}
      result.served_k = extra.get("k", result.served_k)
      if chunk.usage is not None:
        result.tokens = chunk.usage.completion_tokens
      for choice in chunk.choices:
        if choice.text:
          if result.ttft_s is None:
            result.ttft_s = now - start
          else:
            result.gaps_s.append(now - last)
          last = now
        if choice.finish_reason is not None:
          result.finish_reason = choice.finish_reason
    result.total_s = time.perf_counter() - start
    result.ok = result.finish_reason in ("stop", "length") and result.served_k == k
    if not result.ok:
      result.error = f"finish_reason={result.finish_reason}, served k={result.served_k}"
  except Exception as e:  # every failure is counted and reported, none stops the other clients
    result.error = f"{type(e).__name__}: {e}"
  return result


def run_load(url: str, *, clients: int, requests: int, ks: list[int], max_tokens: int, duration_s: float,
             request_timeout_s: float) -> tuple[list[Result], float, int]:
  """(results, wall seconds, requests not started because the deadline passed)."""
  model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
  deadline = time.perf_counter() + duration_s
  skipped = [0]
  lock = threading.Lock()

  def client_loop(i: int) -> list[Result]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=request_timeout_s, max_retries=0)
    out = []
    for j in range(requests):
      if time.perf_counter() > deadline:
        with lock:
          skipped[0] += requests - j
        break
      out.append(one_request(client, model, i, ks[(i + j) % len(ks)], PROMPTS[(i + j) % len(PROMPTS)],
                             max_tokens, seed=1000 * i + j))
    return out

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
  return results, time.perf_counter() - start, skipped[0]


def summarize(results: list[Result], wall_s: float, ks: list[int]) -> dict[str, Any]:
  def pct(xs: list[float], q: float) -> float | None:
    return round(1e3 * float(np.percentile(xs, q)), 2) if xs else None

  per_k = {}
  for k in ks:
    rs = [r for r in results if r.k == k]
    done = [r for r in rs if r.ok]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    gaps = [g for r in done for g in r.gaps_s]
    rates = [(r.tokens - 1) / (r.total_s - r.ttft_s) for r in done if r.tokens > 1 and r.total_s > r.ttft_s]
    per_k[k] = {"requests": len(rs), "ok": len(done), "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
                "token_ms_p50": pct(gaps, 50), "token_ms_p99": pct(gaps, 99),
                "decode_tokens_per_s_p50": round(float(np.median(rates)), 1) if rates else None,
                "tokens_per_s": round(sum(r.tokens for r in done) / wall_s, 1)}
  return {"per_k": per_k, "requests": len(results), "failed": sum(not r.ok for r in results),
          "tokens": sum(r.tokens for r in results), "wall_s": round(wall_s, 2),
          "tokens_per_s": round(sum(r.tokens for r in results) / wall_s, 1),
          "errors": sorted({r.error for r in results if r.error})[:10]}


# ------------------------------------------------------------------------------------------ own server


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log_file) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "phds_jax.serve", f"--checkpoint={args.checkpoint}", "--host=127.0.0.1",
         f"--port={port}", f"--ks={','.join(map(str, args.ks))}", f"--dtype={args.dtype}",
         f"--max_batch={args.max_batch}", f"--max_len={args.max_len}", f"--max_queue={args.max_queue}"]
  return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60) -> int:
  """SIGTERM, then wait; kills (and reports -9) only if it does not exit in time."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  return proc.returncode


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--url", help="an already running server (default: start one)")
  p.add_argument("--checkpoint", default=str(DEMO))
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  p.add_argument("--ks", default="1,2,3,4", type=lambda s: [int(k) for k in s.split(",")])
  p.add_argument("--clients", type=int, default=8)
  p.add_argument("--requests", type=int, default=4, help="requests per client")
  p.add_argument("--max_tokens", type=int, default=32)
  p.add_argument("--max_batch", type=int, default=8)
  p.add_argument("--max_len", type=int, default=256)
  p.add_argument("--max_queue", type=int, default=64)
  p.add_argument("--duration_s", type=float, default=300, help="no request starts after this")
  p.add_argument("--request_timeout_s", type=float, default=120)
  p.add_argument("--startup_timeout_s", type=float, default=600)
  p.add_argument("--out", help="write the summary as JSON here")
  args = p.parse_args(argv)
  if min(args.clients, args.requests, args.max_tokens) < 1 or args.clients > 256:
    p.error("--clients (at most 256), --requests and --max_tokens must be >= 1")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  proc = log = None
  url = args.url
  status = 0
  try:
    if url is None:
      port = free_port()
      url = f"http://127.0.0.1:{port}"
      log = open(os.devnull, "w") if not os.environ.get("SERVE_LOAD_LOG") else open(os.environ["SERVE_LOAD_LOG"], "w")
      proc = start_server(args, port, log)
      start = time.perf_counter()
      wait_healthy(url, proc, args.startup_timeout_s)
      print(f"server ready on {url} in {time.perf_counter() - start:.1f} s (ks {args.ks}, {args.dtype})")
    results, wall_s, skipped = run_load(url, clients=args.clients, requests=args.requests, ks=args.ks,
                                        max_tokens=args.max_tokens, duration_s=args.duration_s,
                                        request_timeout_s=args.request_timeout_s)
    summary = summarize(results, wall_s, args.ks)
    summary.update(skipped_at_deadline=skipped, clients=args.clients, max_tokens=args.max_tokens, url=url)
  finally:
    if proc is not None:
      code = stop_server(proc)
      print(f"server exit code after SIGTERM: {code}")
      status |= code != 0
    if log is not None:
      log.close()
  if proc is not None:
    summary["server_exit_code"] = code
  print(f"{summary['requests']} requests from {args.clients} clients in {summary['wall_s']} s, "
        f"{summary['failed']} failed or lost, {skipped} not started (deadline); {summary['tokens_per_s']} tokens/s")
  print("| k | requests | ok | TTFT p50 / p99 ms | per-token p50 / p99 ms | decode tok/s per request | tok/s |")
  print("|---|---|---|---|---|---|---|")
  for k, s in summary["per_k"].items():
    print(f"| {k} | {s['requests']} | {s['ok']} | {s['ttft_ms_p50']} / {s['ttft_ms_p99']} | {s['token_ms_p50']} / "
          f"{s['token_ms_p99']} | {s['decode_tokens_per_s_p50']} | {s['tokens_per_s']} |")
  for error in summary["errors"]:
    print(f"error: {error}")
  if args.out:
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
  return int(status or summary["failed"] > 0)


if __name__ == "__main__":
  sys.exit(main())
