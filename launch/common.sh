# Sourced by the launch scripts (not run on its own): the argument handling they share.
#
# CONFIG defaults to configs/olmoe.py. `split_args "$@"` sets dry_run=1 when --dry_run is among the arguments
# (else 0) and user_args to the other arguments, in order, to be passed on to phds_jax.train as typed.

CONFIG=${CONFIG:-configs/olmoe.py}

split_args() {
  dry_run=0
  user_args=()
  local a
  for a in "$@"; do
    if [[ "$a" == "--dry_run" ]]; then dry_run=1; else user_args+=("$a"); fi
  done
}
