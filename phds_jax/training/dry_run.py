"""What a training run will do, worked out from the config alone: `python -m phds_jax.train ... --dry_run`.

The plan is for launching, so it never loads weights and never touches an accelerator: parameter shapes come
from the init checkpoint's small config.json (traced abstractly with `jax.eval_shape`), the per-device share of
each parameter from the same sharding rules the trainer uses (`sharding.spec_for`), and the device count is the
target's (`num_devices`), not this host's. It answers the questions a launch needs before it spends a
reservation: the mesh, whether parameters + gradients + AdamW moments fit per device, tokens per step, the k
schedule, and where checkpoints go (and whether every host can see that place).

Not counted: activations (they scale with rows per device × max_len × hidden × layers and depend on XLA's
rematerialisation), XLA scratch, and the data pipeline; leave head-room for them (the `fits` verdict asks for
25% of device memory free after the states).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from phds_jax import sharding
from phds_jax.checkpoint import CONFIG_FILE, config_from_json
from phds_jax.hf.config import config_from_hf
from phds_jax.models.config import ModelConfig
from phds_jax.training import memory
from phds_jax.training.config_checks import batch_error, validate_config

STATE_HEADROOM = 0.75  # states may use at most this share of device memory; the rest is for activations
# Per-device memory of common accelerators, GiB (for the fit verdict when the launch script does not pass one).
DEVICE_MEMORY_GB = {"H100": 80, "H200": 141, "A100-80": 80, "A100-40": 40, "v4": 32, "v5e": 16, "v5p": 95,
                    "v6e": 32}


@dataclasses.dataclass
class Plan:
  """Everything `render` prints; numbers are per device unless named global."""

  config_name: str
  init: str
  model: dict[str, Any]
  num_devices: int
  num_hosts: int
  mesh: dict[str, int]
  param_bytes: int  # per device, in param_dtype
  grad_bytes: int
  adam_bytes: int
  total_params: int
  active_params_k_pre: int
  batch_size: int
  microbatches: int
  max_len: int
  tokens_per_step: int
  num_steps: int
  schedule: str
  workdir: str
  checkpoints: str
  warnings: list[str]
  device_memory_gb: float | None

  @property
  def state_bytes(self) -> int:
    return self.param_bytes + self.grad_bytes + self.adam_bytes

  @property
  def fits(self) -> bool | None:
    """None when the device memory is unknown."""
    if not self.device_memory_gb:
      return None
    return self.state_bytes <= STATE_HEADROOM * self.device_memory_gb * 2**30

  def render(self) -> str:
    gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
    m = self.model
    lines = [
        f"plan for '{self.config_name}' (dry run: nothing loaded, nothing compiled)",
        f"  init:        {self.init}",
        f"  model:       {m['model_type']}, {m['num_layers']} layers, {m['num_experts']} experts, k_pre="
        f"{m['k_pre']}, hidden {m['hidden_size']}; {self.total_params / 1e9:,.3f} B params "
        f"({self.active_params_k_pre / 1e9:,.3f} B active per token at k_pre); param_dtype {m['param_dtype']}, "
        f"compute {m['dtype']}",
        f"  devices:     {self.num_devices} on {self.num_hosts} host(s); mesh "
        + " x ".join(f"{a}={s}" for a, s in self.mesh.items()),
        f"  per device:  params {gib(self.param_bytes)} + grads {gib(self.grad_bytes)} + AdamW moments "
        f"{gib(self.adam_bytes)} = {gib(self.state_bytes)} (activations not included)",
    ]
    if self.device_memory_gb:
      verdict = ("fits" if self.fits else "DOES NOT FIT")
      lines.append(f"  memory:      {verdict}: states use {self.state_bytes / (self.device_memory_gb * 2**30):.0%} of "
                   f"{self.device_memory_gb:g} GiB per device (at most {STATE_HEADROOM:.0%} leaves room for "
                   "activations)")
    lines += [
        f"  batch:       {self.batch_size} rows x {self.max_len} tokens = {self.tokens_per_step:,} tokens per step "
        f"(at most: packed), {self.microbatches} microbatch(es), "
        f"{self.batch_size // self.microbatches // self.num_devices} row(s) per device per microbatch",
        f"  steps:       {self.num_steps:,} ({self.tokens_per_step * self.num_steps / 1e9:,.3f} B tokens at most)",
        f"  k schedule:  {self.schedule}",
        f"  workdir:     {self.workdir}",
        f"  checkpoints: {self.checkpoints}",
    ]
    lines += [f"  warning:     {w}" for w in self.warnings]
    return "\n".join(lines)


def _read_json(path: str) -> dict:
  return json.loads(epath.Path(path).read_text())


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The ModelConfig the trainer would build, from the init checkpoint's JSON only (no weights)."""
  init = config.init
  if init.kind == "scratch":
    cfg = ModelConfig(**dict(config.scratch_model))
  elif init.kind == "orbax":
    cfg = config_from_json(json.dumps(_read_json(os.path.join(init.path, CONFIG_FILE))))
  else:
    cfg = config_from_hf(_read_json(os.path.join(init.path, "config.json")))
  return cfg.replace(**dict(config.model))


def param_shapes(cfg: ModelConfig) -> Any:
  """ShapeDtypeStructs of the parameter tree in param_dtype, traced without allocating anything."""
  shapes = memory.param_shapes(cfg)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(cfg.param_dtype)), shapes)


def active_params(cfg: ModelConfig, shapes: Any, k: int) -> int:
  """Parameters a token passes through at top-k: everything but the unchosen routed experts."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  routed_per_expert = 3 * cfg.hidden_size * cfg.moe_ffn
  return total - sum(cfg.moe_layers) * (cfg.num_experts - k) * routed_per_expert


def _schedule_text(config: ml_collections.ConfigDict) -> str:
  s = config.schedule
  text = f"{s.mode}, K_train={tuple(s.k_train)}, per {s.granularity}"
  if s.mode == "curriculum":
    unit = s.get("switch_unit", "fraction")
    start = f"step {int(s.switch_at * config.num_steps):,}" if unit == "fraction" else f"{s.switch_at:g} {unit}"
    text += f", anchored at k={s.anchor} from {start}" + (f" (ramp {s.ramp:g})" if s.ramp else " (hard switch)")
  if config.get("num_epochs"):  # training/protocol.py counts the packed rows at start and prints the steps
    text += (f"; length {config.num_epochs:g} epoch(s) of the packed data, in steps counted at start "
             f"(num_steps {config.num_steps:,} is then unused)")
  return text


def make_plan(config: ml_collections.ConfigDict, workdir: str, num_devices: int, *, num_hosts: int = 1,
              device_memory_gb: float | None = None) -> Plan:
  """The plan of `config` on `num_devices` devices over `num_hosts` hosts (see the module docstring)."""
  cfg = model_config(config)
  shapes = param_shapes(cfg)
  mesh = sharding.mesh_sizes(dict(config.mesh), num_devices)
  sharding.validate_mesh_for_model(mesh, cfg.num_experts)
  param_bytes = memory.shard_bytes(shapes, mesh)  # gradients and optax's AdamW moments share param_dtype
  warnings = []
  remote = "://" in workdir
  if num_hosts > 1 and not remote:
    warnings.append(f"{num_hosts} hosts write checkpoints under {workdir}: it must be one directory every host "
                    "sees (a shared filesystem, or gs://); so must init.path and data.path")
  uneven = batch_error(config.batch_size, config.microbatches, num_devices)
  if uneven:
    warnings.append(f"{uneven}: the trainer will refuse it")
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  ck = config.checkpoint
  sel = config.get("select", {})
  mc = sel.get("signal") == "mc"
  keep = (f"every {ck.every_steps:,} steps, the latest {ck.keep} kept"
          + (f" plus the best by validation {'MC accuracy' if mc else 'loss'} (select.*)"
             if mc or (config.data.get("validation_fraction", 0) > 0 and config.eval.batches > 0) else ""))
  return Plan(
      config_name=config.name, init=f"{config.init.kind}:{config.init.path}",
      model=dict(model_type=cfg.model_type, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                 k_pre=cfg.k_pre, hidden_size=cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype),
      num_devices=num_devices, num_hosts=num_hosts, mesh=mesh, param_bytes=param_bytes, grad_bytes=param_bytes,
      adam_bytes=2 * param_bytes, total_params=total, active_params_k_pre=active_params(cfg, shapes, cfg.k_pre),
      batch_size=config.batch_size, microbatches=config.microbatches, max_len=config.data.max_len,
      tokens_per_step=config.batch_size * config.data.max_len, num_steps=config.num_steps,
      schedule=_schedule_text(config), workdir=workdir,
      checkpoints=f"{workdir.rstrip('/')}/checkpoints/<step> ({keep}); final weights in "
                  f"{workdir.rstrip('/')}/final/orbax and final/hf",
      warnings=warnings, device_memory_gb=device_memory_gb)


EXIT_DOES_NOT_FIT = 3


def dry_run(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int = 0, num_hosts: int = 1,
            device_memory_gb: float = 0.0) -> int:
  """Validates `config` as the trainer would and prints its plan; the exit status for `train --dry_run`.

  `num_devices` > 0 plans for that many devices on the CPU backend (simulated devices, so a laptop or a login
  node can plan a pod: nothing runs on them); 0 plans for this host's devices. Returns 0, or EXIT_DOES_NOT_FIT
  when `device_memory_gb` (0 = this device's, if it reports it) is known and the states do not fit.
  """
  if num_devices:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
  validate_config(config)
  if not num_devices and not device_memory_gb:
    stats = jax.devices()[0].memory_stats() or {}
    device_memory_gb = stats.get("bytes_limit", 0) / 2**30
  result = make_plan(config, workdir, jax.device_count(), num_hosts=num_hosts,
                     device_memory_gb=device_memory_gb or None)
  print(result.render(), flush=True)
  if result.fits is False:
    print(f"the per-device states alone exceed {STATE_HEADROOM:.0%} of device memory: use more devices on the "
          "fsdp/expert axes, or a smaller model", flush=True)
    return EXIT_DOES_NOT_FIT
  return 0
