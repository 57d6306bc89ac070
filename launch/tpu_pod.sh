#!/usr/bin/env bash
# PHDS on a Cloud TPU pod slice: the same command runs on every host (jax.distributed finds its peers).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a CONFIG=configs/olmoe.py ./launch/tpu_pod.sh --config.init.path=gs://...
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${CONFIG:-configs/olmoe.py}
WORKDIR=${WORKDIR:-gs://YOUR_BUCKET/runs/phds-$(date +%Y%m%d-%H%M%S)}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ~/phds_jax && pip install -q -e '.[tpu]' &&
  python -m phds_jax.train --distributed --config=$CONFIG --workdir=$WORKDIR $*"
