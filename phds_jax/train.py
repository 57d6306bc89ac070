r"""PHDS fine-tuning: one checkpoint that runs at every k.

    python -m phds_jax.train --config=configs/demo.py                 # offline demo, CPU, minutes
    python -m phds_jax.train --config=configs/olmoe.py --config.init.path=/ckpt/OLMoE-1B-7B-0125 \
        --config.data.path=/data/tulu3.jsonl --workdir=runs/olmoe-phds
    python -m phds_jax.train --config=configs/olmoe.py:tiny ...        # a small variant for smoke runs

Re-running with the same --workdir resumes from its newest verified checkpoint if the config still matches
(see phds_jax/training/resume.py; --config.resume.allow_changes=FIELD,... to accept a change). User errors print
one line and exit with status 2; --debug shows their traceback.
"""

import logging as py_logging
import os
import sys
import time

from absl import flags, logging
import jax
from ml_collections import config_flags

from phds_jax import cli
from phds_jax.training import dry_run
from phds_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots); default runs/<name>-<time>.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (TPU pods, multi-node GPU).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate the config and print the plan (mesh, per-device memory, "
                             "tokens per step, checkpoints) without loading weights; exit 3 if it does not fit.")
_PLAN_DEVICES = flags.DEFINE_integer("plan_devices", 0, "--dry_run: plan for this many devices (0 = this host's).")
_PLAN_HOSTS = flags.DEFINE_integer("plan_hosts", 1, "--dry_run: number of hosts (processes) the run will use.")
_PLAN_MEMORY = flags.DEFINE_float("plan_device_memory_gb", 0.0, "--dry_run: memory per device in GiB (0 = ask it).")
flags.mark_flags_as_required(["config"])


class _OnlyOurInfo(py_logging.Filter):
  """Keeps INFO lines from phds_jax and warnings from everyone (orbax and friends log a lot at INFO)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "phds_jax" in record.pathname


def per_k_table(result) -> str:
  """k | held-out loss | each final-eval task's primary metric."""
  ks = sorted(set(result.heldout_loss_by_k) | {k for v in result.accuracy_by_k.values() for k in v})
  tasks = sorted(result.accuracy_by_k)
  lines = [" | ".join(["  k", "held-out loss"] + tasks)]
  for k in ks:
    loss = result.heldout_loss_by_k.get(k)
    cells = [f"{k:>3}", f"{loss:>13.4f}" if loss is not None else f"{'-':>13}"]
    cells += [f"{result.accuracy_by_k[t].get(k, float('nan')):>{len(t)}.3f}" for t in tasks]
    lines.append(" | ".join(cells))
  return "\n".join(lines)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  if _DRY_RUN.value:
    config = _CONFIG.value
    sys.exit(dry_run.dry_run(config, _WORKDIR.value or os.path.join("runs", f"{config.name}-<time>"),
                          num_devices=_PLAN_DEVICES.value, num_hosts=_PLAN_HOSTS.value,
                          device_memory_gb=_PLAN_MEMORY.value))
  if _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; GPUs/TPUs use their own
    jax.distributed.initialize()
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
  logging.info("workdir: %s | devices: %s", workdir, jax.devices())
  result = train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    print(f"\nworkdir: {result.workdir}")
    print(per_k_table(result))
    if result.hf_dir:
      print(f"HF checkpoint: {result.hf_dir}")


if __name__ == "__main__":
  cli.run(main)
