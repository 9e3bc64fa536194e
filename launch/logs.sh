#!/usr/bin/env bash
# A run's log on a worker (default: worker 0, the newest run); --follow streams it.
# Attached runs also keep each worker's output in runs/tpu/NAME/RUN/worker-N.log here.
#
#   launch/logs.sh --name=NAME --zone=ZONE [--worker=N|all] [--run-id=ID] [--follow]

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
require NAME ZONE
args=(bash dit_jax_worker.sh logs)
[[ -n $DIT_TPU_RUN_ID ]] && args+=("$DIT_TPU_RUN_ID")
[[ $DIT_TPU_FOLLOW == 1 ]] && args+=(--follow)
gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker="$DIT_TPU_WORKER" --command="$(shell_join "${args[@]}")"
