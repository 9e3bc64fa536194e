#!/usr/bin/env bash
# Keep a command running on a slice until it finishes: create the slice when missing; when it is
# preempted, suspended or lost, delete it, create it again, set it up and rerun the command (the
# trainer resumes from its newest checkpoint). Exit 143 (preempted) and lost ssh connections
# are not counted; any other failure is retried up to --retries times.
#
#   launch/babysit.sh --name=NAME --zone=ZONE --accelerator=v3-32 --capacity=spot -- main --config ... --workdir DIR
#
# Takes every flag of create.sh, setup.sh and run.sh (except --detach), and --retries N (3),
# --poll seconds (30); every flag is also DIT_TPU_<FLAG>. --dry-run prints one pass.

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
[[ $DIT_TPU_DETACH == 1 ]] && die "babysit.sh runs attached; run it under nohup/tmux instead of --detach"
babysit "${ARGS[@]}"
