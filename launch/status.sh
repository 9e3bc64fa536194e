#!/usr/bin/env bash
# The slice's state and, per worker, whether its runs are running or how they exited.
#
#   launch/status.sh --name=NAME --zone=ZONE [--run-id=ID] [--project] [--dry-run]

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
require NAME ZONE
state=$(slice_state READY)
echo "$DIT_TPU_NAME: $state"
if [[ $state == READY ]]; then
    gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker=all --command="$(shell_join bash dit_jax_worker.sh status ${DIT_TPU_RUN_ID:+"$DIT_TPU_RUN_ID"})"
fi
