#!/usr/bin/env bash
# PHDS on several GPU nodes (one process per node, all local GPUs per process), e.g. from a Slurm batch script:
#   srun --nodes=2 --ntasks-per-node=1 ./launch/gpu_multinode.sh --config.init.path=/ckpt/OLMoE-1B-7B-0125
# jax.distributed.initialize() reads the Slurm environment; set JAX_COORDINATOR_ADDRESS etc. elsewhere.
set -euo pipefail
CONFIG=${CONFIG:-configs/olmoe.py}
WORKDIR=${WORKDIR:-runs/phds-${SLURM_JOB_ID:-local}}
exec python -m phds_jax.train --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@"
