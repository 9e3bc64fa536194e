#!/usr/bin/env bash
# Run `python -m dit_jax.COMMAND ARGS` on every worker at once (train = main, extract_latents,
# sample, evaluate, ...), with JAX_PLATFORMS=tpu so a held TPU fails instead of falling back to
# the CPU. Each worker's output goes to runs/tpu/NAME/RUN/worker-N.log; when one worker fails
# the others are stopped. Exits with the run's status (143: preempted).
#
#   launch/run.sh --name=NAME --zone=ZONE --accelerator=v3-32 [--detach] -- main --config configs/dit_xl2_256.py --workdir DIR
#
# The command runs in ~/dit_jax on each worker; ~/ at the start of an argument (or after --flag=)
# is the worker's home there (quote it here: '~/gcs/runs/xl2').
# --detach starts it and returns (follow with launch/logs.sh, stop with launch/stop.sh).
# --run-id ID (default run-DATE-TIME), --log-dir DIR (default runs/tpu/NAME), --platforms (tpu),
# --grace seconds between SIGTERM and SIGKILL when stopping (120), --project, --dry-run;
# every flag is also DIT_TPU_<FLAG>.

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
((${#ARGS[@]})) || die "no command: launch/run.sh [flags] -- main --config ... --workdir ..."
run_on_workers "$(new_run_id)" "${ARGS[@]}"
