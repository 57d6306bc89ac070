"""Resuming a run: the new config is compared with the one the checkpoint was trained with.

Fields that change what is trained (model and init, K_train and its schedule, optimizer, loss, data, batch,
microbatches, seed, ...) must match, unless named in `--config.resume.allow_changes` (a field or a section,
e.g. `optimizer.lr` or `optimizer`). Fields that only change how the run is observed or stored (`SAFE`) may
change freely. `num_steps` may be raised, or lowered down to the checkpoint's step (never below it); the steps
still to run then follow the schedules the new `num_steps` defines: the lr is that of a run planned with the
new length (extending a decayed run raises the lr at the resume step to where the longer run would be; the
jump is logged), and the k curriculum's `switch_at` is a fraction of the new `num_steps`. Steps already taken
are never re-run. Each start is appended to `run_history.jsonl`, with the changes it was allowed.
"""

from __future__ import annotations

import json
import time
from typing import Any

import ml_collections

from configs.base import base_config
from phds_jax import paths
from phds_jax.checkpoint import ResumeError

# Dotted prefixes that do not alter what is trained (observation, storage, kernels, performance).
SAFE = ("name", "num_steps", "resume", "max_nonfinite_in_a_row", "checkpoint", "eval", "final_eval", "export",
        "peak_tflops", "mesh", "data.num_threads", "model.gmm_impl", "model.routing_impl")
HISTORY = "run_history.jsonl"


def plain(config: ml_collections.ConfigDict | dict) -> dict:
  """The config as JSON-compatible nested dicts (tuples -> lists), as stored in checkpoint metadata."""
  d = config.to_dict() if hasattr(config, "to_dict") else config
  return json.loads(json.dumps(d, default=str))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _covered(field: str, names: tuple[str, ...]) -> bool:
  return any(field == n or field.startswith(n + ".") for n in names)


def allowed_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  raw = config.get("resume", {}).get("allow_changes", ())
  items = raw.split(",") if isinstance(raw, str) else list(raw)
  return tuple(s.strip() for s in items if s and s.strip())


def config_changes(saved: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
  """field -> (saved value, new value) for every leaf that differs (missing = None).

  A field the saved config lacks (added to phds_jax after the run started) is no change when the new config
  holds its default (`defaults`, flattened like the configs).
  """
  a, b, d = flatten(saved), flatten(new), flatten(defaults or {})
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and not (k not in a and k in d and b.get(k) == d[k])}


def _defaults() -> dict:
  return plain(base_config())


def check(config: ml_collections.ConfigDict, saved_meta: dict | None, step: int) -> dict[str, tuple[Any, Any]]:
  """Raises ResumeError if resuming `step` with `config` would silently train something else; returns changes."""
  if config.num_steps < step:
    raise ResumeError(f"num_steps={config.num_steps} is below the checkpoint's step {step} in this workdir",
                      fix=f"--config.num_steps={step} (or more) to resume, or a new --workdir to start over")
  saved = (saved_meta or {}).get("config")
  if saved is None:
    raise ResumeError(f"checkpoint step {step} holds no config to compare with (older format)",
                      fix="use a new --workdir")
  changes = config_changes(saved, plain(config), _defaults())
  allowed = allowed_changes(config)
  refused = {k: v for k, v in changes.items() if not _covered(k, SAFE) and not _covered(k, allowed)}
  if refused:
    diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    raise ResumeError(f"the config differs from the one checkpoint step {step} was trained with: {diff}",
                      fix=f"resume with the original values, allow them with "
                          f"--config.resume.allow_changes={','.join(refused)}, or use a new --workdir")
  return changes


def append_history(workdir: str, config: ml_collections.ConfigDict, start_step: int,
                   changes: dict[str, tuple[Any, Any]]) -> None:
  """One JSON line per start: when, from which step, the config, the allowed changes (never overwritten)."""
  entry = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), start_step=int(start_step), config=plain(config),
               allow_changes=list(allowed_changes(config)),
               changes={k: [old, new] for k, (old, new) in changes.items()})
  paths.append_text(paths.join(workdir, HISTORY), json.dumps(entry, default=str) + "\n")
