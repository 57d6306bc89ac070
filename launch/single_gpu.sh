#!/usr/bin/env bash
# PHDS on one machine (one process, every local GPU; no jax.distributed needed).
#
#   ./launch/single_gpu.sh --config.init.path=/ckpt/OLMoE-1B-7B-0125 --config.data.path='/data/tulu/*.parquet'
#   ./launch/single_gpu.sh --dry_run --config.init.path=... --config.data.path=...   # the plan only
#
# Layout: parameters, gradients and AdamW moments are sharded over the `fsdp` axis across all local GPUs
# (mesh data=1, fsdp=<GPUs>, expert=1). OLMoE-1B-7B (6.9 B parameters, fp32 master weights) needs 103 GiB for
# those states alone (params 26 + grads 26 + Adam 52 GiB), so it does NOT fit one 80 GB GPU with any layout: the
# script refuses after its dry run. Two 80 GB GPUs hold 52 GiB each (tight with activations), 4 GPUs 26 GiB, 8
# GPUs 13 GiB. Smaller MoEs and configs/demo.py fit one GPU.
#
# Environment: CONFIG (default configs/olmoe.py), WORKDIR (default runs/<name>-<time>), NUM_GPUS (default:
# nvidia-smi's count, else 1), GPU_MEM_GB (default 80), PYTHON (default python).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PYTHON=${PYTHON:-python}
GPU_MEM_GB=${GPU_MEM_GB:-80}
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$NUM_GPUS" -ge 1 ]] 2>/dev/null || NUM_GPUS=1
fi
args=(--config="$CONFIG" --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.expert=1)
[[ -n "${WORKDIR:-}" ]] && args+=(--workdir="$WORKDIR")
plan=(--dry_run --plan_devices="$NUM_GPUS" --plan_device_memory_gb="$GPU_MEM_GB")

split_args "$@"
if (( dry_run )); then
  exec "$PYTHON" -m phds_jax.train "${args[@]}" "${user_args[@]}" "${plan[@]}"
fi
# The plan first: a config that cannot fit stops here, in seconds, not after loading 7 B parameters.
set +e
"$PYTHON" -m phds_jax.train "${args[@]}" "${user_args[@]}" "${plan[@]}"
status=$?
set -e
if (( status != 0 )); then
  echo "single_gpu.sh: not starting (the dry run above exited with $status)" >&2
  exit "$status"
fi
exec "$PYTHON" -m phds_jax.train "${args[@]}" "${user_args[@]}"
