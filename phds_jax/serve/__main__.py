"""Serve one checkpoint at any k over OpenAI-compatible HTTP: `python -m phds_jax.serve --checkpoint=DIR`.

Loads the checkpoint (a Hugging Face directory such as `phds_jax/assets/demo_base` or a run's `final/hf`),
compiles every offered k before the port opens (one log line each, nothing compiles while serving), then serves
with uvicorn. SIGTERM / Ctrl-C: the port closes, in-flight requests finish, the scheduler drains, exit 0.

    python -m phds_jax.serve --checkpoint=phds_jax/assets/demo_base --dtype=float32 --port=8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0, "k": 2}'
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import uvicorn
from absl import app, flags

from phds_jax import checkpoint, kplan
from phds_jax.data.tokenize import ChatTokenizer
from phds_jax.serve.app import KPolicy, create_app
from phds_jax.serve.profile import load_profile
from phds_jax.serve.scheduler import Scheduler

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> flags.FlagValues:
  """Defines the CLI flags on `fv` (only when run as a script, so importing defines nothing)."""
  kw = {"flag_values": fv}
  flags.DEFINE_string("checkpoint", None, "Hugging Face checkpoint dir (config.json, safetensors, tokenizer.json) "
                      "or a phds_jax params checkpoint with tokenizer.json beside it.", required=True, **kw)
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind.", **kw)
  flags.DEFINE_integer("port", 8000, "Port to bind.", **kw)
  flags.DEFINE_list("ks", None, "Top-k levels to offer (default 1..k_pre); each is compiled at start-up.", **kw)
  flags.DEFINE_integer("default_k", None, "k of requests that name neither k nor latency_budget_ms "
                       "(default k_pre).", **kw)
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                    "Parameter and compute dtype (float32 for exact comparisons).", **kw)
  flags.DEFINE_integer("max_batch", 8, "Sequence slots decoded together.", **kw)
  flags.DEFINE_integer("max_len", None, "Longest prompt + completion in tokens (default: the model's "
                       "max_position_embeddings).", **kw)
  flags.DEFINE_integer("max_queue", 64, "Requests that may wait for a slot; more get 429.", **kw)
  flags.DEFINE_integer("steps_per_call", 1, "Tokens each decode dispatch generates per slot (fed back on the "
                       "device): more amortises dispatch on GPUs, but tokens stream in bursts and new requests "
                       "wait up to that many steps for a slot.", lower_bound=1, **kw)
  flags.DEFINE_string("profile", None, "pareto.json from `python -m phds_jax.serve.profile`: enables "
                      "latency_budget_ms.", **kw)
  flags.DEFINE_string("model_name", None, "Model id clients send (default: the checkpoint directory's name).",
                      **kw)
  flags.DEFINE_float("drain_timeout_s", 300.0, "On SIGTERM, how long in-flight requests may take to finish before "
                     "they are cancelled.", **kw)
  flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "uvicorn log level.", **kw)
  return fv


def serve(fv: flags.FlagValues = FLAGS) -> None:
  """Loads, warms up, serves until SIGTERM/SIGINT, drains. Returns normally after a graceful shutdown."""
  root = Path(fv.checkpoint)
  try:  # every user error (missing files, bad profile, ks / default_k / profile that disagree) before compiling
    profile = load_profile(fv.profile) if fv.profile else None
    cfg, params = checkpoint.load_model(root, dtype=fv.dtype)
    tokenizer = ChatTokenizer.from_dir(str(root))
    ks = sorted({int(k) for k in fv.ks}) if fv.ks else kplan.default_ks(cfg.k_pre)
    default_k = fv.default_k if fv.default_k is not None else kplan.reference_k(cfg.k_pre, ks)
    KPolicy(cfg.k_pre, tuple(ks), default_k, profile)
  except (OSError, ValueError) as e:  # CheckpointError, ConfigError, ProfileError are ValueErrors
    raise app.UsageError(f"{type(e).__name__}: {e}") from e
  max_len = fv.max_len or cfg.max_position_embeddings
  eos_ids = _eos_ids(root, tokenizer)
  logging.info("serving %s: %s, k_pre=%d, ks=%s (default %d), dtype %s, max_batch %d, max_len %d, eos %s",
               root, cfg.model_type, cfg.k_pre, ks, default_k, fv.dtype, fv.max_batch, max_len, eos_ids)

  scheduler = Scheduler(cfg, params, ks=tuple(ks), max_batch=fv.max_batch, max_len=max_len,
                        max_queue=fv.max_queue, eos_ids=eos_ids, steps_per_call=fv.steps_per_call)
  start = time.perf_counter()
  scheduler.warmup()
  logging.info("compiled every offered k in %.1f s", time.perf_counter() - start)
  scheduler.start()
  state = {"shut": False}
  try:
    fastapi_app = create_app(scheduler, tokenizer, model_name=fv.model_name or root.absolute().name,
                             k_pre=cfg.k_pre, default_k=default_k, profile=profile, vocab_size=cfg.vocab_size,
                             drain_timeout=fv.drain_timeout_s)
    server = uvicorn.Server(uvicorn.Config(fastapi_app, host=fv.host, port=fv.port, log_level=fv.log_level,
                                           timeout_graceful_shutdown=fv.drain_timeout_s))
    # uvicorn re-raises the signal it caught once it has shut down, to run the previous handler; ours only logs,
    # so a graceful SIGTERM ends with exit status 0 instead of being killed by the default handler.
    signal.signal(signal.SIGTERM, lambda *_: logging.info("SIGTERM: shut down gracefully"))
    server.run()
    state["shut"] = server.started  # the lifespan's shutdown drained the scheduler
  finally:
    if not state["shut"]:
      scheduler.shutdown(drain=False)


def _eos_ids(root: Path, tokenizer) -> tuple[int, ...]:
  """EOS ids from the tokenizer config and generation_config.json (an id or a list of ids)."""
  ids = {tokenizer.eos_id} - {None}
  gen = root / "generation_config.json"
  if gen.is_file():
    value = json.loads(gen.read_text()).get("eos_token_id")
    ids |= set(value if isinstance(value, list) else [value] if value is not None else [])
  return tuple(sorted(ids))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  serve(FLAGS)


if __name__ == "__main__":
  define_flags()
  app.run(main)
