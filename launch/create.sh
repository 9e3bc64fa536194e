#!/usr/bin/env bash
# Create a TPU slice and wait until it is ready (nothing happens when it already is).
#
#   launch/create.sh --name=NAME --zone=ZONE [--accelerator=v3-32] [--capacity=spot] [--mode=queued]
#
# --mode queued (default: a queued resource, which waits for capacity) or direct (tpu-vm create).
# --capacity on-demand (default), spot, preemptible (direct only), reserved, best-effort (queued only).
# --accelerator v2-N, v3-N (v3-8 ... v3-2048), v4-N, v5p-N, v5litepod-N (v5e), v6e-N; default v3-8.
# --version the TPU software version (default: derived from the accelerator).
# --extra-create-flags 'WORDS' appended to the create command (e.g. '--network=N --subnetwork=S').
# --poll seconds between looks (30), --wait-timeout give up after seconds (0: never).
# --project, --dry-run (print each gcloud command instead of running it). Every flag --foo-bar
# is also the environment variable DIT_TPU_FOO_BAR.

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
create_slice
