#!/usr/bin/env bash
# PHDS on a Cloud TPU VM slice (one host or a pod slice): copies this checkout to every worker, installs it, and
# starts the same training command on all of them with --distributed (jax.distributed finds its peers).
#
#   TPU_NAME=my-v5p-16 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/phds-1 ./launch/tpu_pod.sh \
#       --config.init.path=gs://my-bucket/ckpt/OLMoE-1B-7B-0125 --config.data.path='gs://my-bucket/tulu/*.parquet'
#   ... ./launch/tpu_pod.sh --dry_run ...   # print the gcloud commands and the training plan; run nothing remote
#
# Storage: every worker reads init.path and data.path and writes checkpoints to WORKDIR together, so WORKDIR must
# be gs:// (required here) and the inputs gs:// or present at the same path on every worker.
#
# Environment: TPU_NAME, ZONE (required), WORKDIR (required, gs://...), PROJECT (optional gcloud project),
# CONFIG (default configs/olmoe.py), ACCELERATOR_TYPE (e.g. v5p-16; default: asked from gcloud, required for
# --dry_run), PIP_EXTRA (default tpu: the project is installed with pip install -e '.[tpu]'), PYTHON (default
# python3 on the workers), KEEP_BUNDLE (a path: keep a copy of the code bundle there).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (gs://bucket/path)}"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_pod.sh: WORKDIR=$WORKDIR must be gs://...: every worker writes the same checkpoints" >&2
  exit 2
fi
PIP_EXTRA=${PIP_EXTRA:-tpu}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/launch/common.sh"

split_args "$@"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

run() {  # prints the command (shell-quoted, so it can be pasted), runs it unless --dry_run
  printf '+'; printf ' %q' "$@"; printf '\n'
  (( dry_run )) || "$@"
}

if [[ -z "${ACCELERATOR_TYPE:-}" ]]; then
  if (( dry_run )); then
    echo "tpu_pod.sh: --dry_run needs ACCELERATOR_TYPE (e.g. v5p-16)" >&2
    exit 2
  fi
  ACCELERATOR_TYPE=$("${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(acceleratorType)')
fi
# Chips and hosts of the slice: v2/v3/v4/v5p names count TensorCores (2 per chip), v5e/v6e names count chips;
# 4 chips per host, except single-host v5e/v6e slices of up to 8 chips.
family=${ACCELERATOR_TYPE%%-*}
count=${ACCELERATOR_TYPE##*-}
case "$family" in
  v2|v3|v4|v5p) chips=$(( count / 2 )) ;;
  *) chips=$count ;;
esac
if [[ "$family" =~ ^v(5e|5litepod|6e)$ && $chips -le 8 ]]; then hosts=1; else hosts=$(( chips > 4 ? chips / 4 : 1 )); fi
case "$family" in
  v2) mem=8 ;; v3) mem=16 ;; v4) mem=32 ;; v5p) mem=95 ;; v5e|v5litepod) mem=16 ;; v6e) mem=32 ;; *) mem=0 ;;
esac
echo "tpu_pod.sh: $TPU_NAME ($ACCELERATOR_TYPE: $chips chips on $hosts host(s)), workdir $WORKDIR"

# 1. The code: this checkout's tracked and untracked-but-not-ignored files (uncommitted edits included).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bundle=$tmp/phds_jax.tar.gz
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$REPO" ls-files -co --exclude-standard -z | tar -C "$REPO" --null -T - -czf "$bundle"
else
  tar -C "$REPO" --exclude=./runs --exclude=.git -czf "$bundle" .
fi
echo "tpu_pod.sh: code bundle $bundle ($(du -h "$bundle" | cut -f1), $(tar -tzf "$bundle" | wc -l) files)"
[[ -n "${KEEP_BUNDLE:-}" ]] && cp "$bundle" "$KEEP_BUNDLE"
run "${gcloud_tpu[@]}" scp "$bundle" "$TPU_NAME":/tmp/phds_jax.tar.gz --worker=all "${where[@]}"

# 2. Install on every worker (the runtime's jax[tpu] comes from the extra).
install="rm -rf ~/phds_jax && mkdir -p ~/phds_jax && tar -xzf /tmp/phds_jax.tar.gz -C ~/phds_jax"
install+=" && cd ~/phds_jax && $PYTHON -m pip install -q -e $(printf '%q' ".[$PIP_EXTRA]")"
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$install"

# 3. Train: every argument is quoted for the remote shell, so spaces, quotes and globs arrive as typed.
train=("$PYTHON" -m phds_jax.train --distributed --config="$CONFIG" --workdir="$WORKDIR" "${user_args[@]}")
remote="cd ~/phds_jax && $(printf '%q ' "${train[@]}")"
if (( dry_run )); then
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$remote"
  echo "tpu_pod.sh: dry run: nothing was copied or started; the plan for this slice:"
  cd "$REPO"
  python -m phds_jax.train --config="$CONFIG" --workdir="$WORKDIR" "${user_args[@]}" --dry_run \
      --plan_devices="$chips" --plan_hosts="$hosts" --plan_device_memory_gb="$mem"
  exit $?
fi
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all "${where[@]}" --command="$remote"
