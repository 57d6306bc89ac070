#!/usr/bin/env bash
# PHDS on several GPU nodes with Slurm: one process per node driving all of its GPUs (jax.distributed reads the
# Slurm environment: coordinator, process count and id). Submit it as a batch job:
#
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=1 launch/gpu_multinode.sh \
#       --config.init.path=/shared/ckpt/OLMoE-1B-7B-0125 --config.data.path='/shared/data/tulu/*.parquet'
#   NODES=2 GPUS_PER_NODE=8 launch/gpu_multinode.sh --dry_run --config.init.path=... --config.data.path=...
#
# Shared storage: every node reads init.path and data.path and writes the same WORKDIR (checkpoints are written
# by all processes together, each its own shards), so all three must be on a filesystem every node mounts at the
# same path (NFS, Lustre, GPFS) or on gs:// / s3://. A node-local path silently splits the run.
#
# Environment: CONFIG (default configs/olmoe.py), WORKDIR (default /shared/$USER/runs/phds-<job id>: change
# /shared to your shared mount), GPUS_PER_NODE (default 8), NODES (dry run only; in a job Slurm sets it),
# PYTHON (default python).
#SBATCH --job-name=phds
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
# sbatch runs a spool copy of this file, so common.sh may not sit beside it; the job starts in the submit directory
# (the checkout, as the relative configs/ path assumes).
common=$(dirname "${BASH_SOURCE[0]}")/common.sh
[[ -f "$common" ]] || common=launch/common.sh
source "$common"
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODES=${SLURM_JOB_NUM_NODES:-${NODES:-1}}
WORKDIR=${WORKDIR:-/shared/${USER:-user}/runs/phds-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}
args=(--config="$CONFIG" --workdir="$WORKDIR")

split_args "$@"
if (( dry_run )); then
  exec "$PYTHON" -m phds_jax.train "${args[@]}" "${user_args[@]}" --dry_run \
      --plan_devices=$(( NODES * GPUS_PER_NODE )) --plan_hosts="$NODES" --plan_device_memory_gb="${GPU_MEM_GB:-80}"
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "gpu_multinode.sh: not inside a Slurm job; submit it with sbatch (see the header), or use --dry_run" >&2
  exit 2
fi
echo "gpu_multinode.sh: $NODES node(s) x $GPUS_PER_NODE GPU(s), workdir $WORKDIR"
# One task per node; each sees all of its node's GPUs.
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "$PYTHON" -m phds_jax.train --distributed "${args[@]}" "${user_args[@]}"
