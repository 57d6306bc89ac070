#!/usr/bin/env bash
# PHDS on one machine with one or more GPUs (no jax.distributed needed):
#   ./launch/single_gpu.sh --config.init.path=/ckpt/OLMoE-1B-7B-0125 --config.data.path='/data/tulu/*.parquet'
set -euo pipefail
CONFIG=${CONFIG:-configs/olmoe.py}
exec python -m phds_jax.train --config="$CONFIG" --config.mesh.expert=1 "$@"
