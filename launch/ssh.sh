#!/usr/bin/env bash
# Open a shell on a worker (default 0), or run a shell command there (--worker=all: on every one).
#
#   launch/ssh.sh --name=NAME --zone=ZONE [--worker=N|all] [-- COMMAND...]

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
require NAME ZONE
if ((${#ARGS[@]})); then
    gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker="$DIT_TPU_WORKER" --command="${ARGS[*]}"
else
    gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker="$DIT_TPU_WORKER"
fi
