#!/usr/bin/env bash
# Stop a run on every worker: SIGTERM (the trainer checkpoints and exits 143), SIGKILL after --grace seconds.
#
#   launch/stop.sh --name=NAME --zone=ZONE --run-id=ID [--grace=120]

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
require NAME ZONE RUN_ID
gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker=all --command="$(shell_join bash dit_jax_worker.sh stop "$DIT_TPU_RUN_ID" "$DIT_TPU_GRACE")"
