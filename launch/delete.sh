#!/usr/bin/env bash
# Delete the slice (queued mode: the queued resource and its node) and wait until it is gone.
#
#   launch/delete.sh --name=NAME --zone=ZONE [--mode=queued|direct] [--project] [--dry-run]

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
delete_slice
