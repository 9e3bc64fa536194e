#!/usr/bin/env bash
# Set up every worker of a slice (idempotent: rerun it freely): a Python >= 3.11 venv with
# jax[tpu] at the project's pinned version and the requirements, the project itself, and
# optionally a gcsfuse mount and a local copy of the latents.
#
#   launch/setup.sh --name=NAME --zone=ZONE [--source=local|git] [--gcs-bucket=B] [--latents-src=gs://B/latents]
#
# --source local (default: this checkout's tracked and untracked, not ignored, files) or git
#   (--repo URL, default this checkout's origin; --ref REF, default main).
# --gcs-bucket B mounts gs://B at ~/--mount-dir (default ~/gcs) with gcsfuse.
# --latents-src gs://... (or a worker path) is copied to ~/--latents-dir (default ~/latents).
# --python the venv's Python (default 3.11; fetched by uv when the image has none).
# --accelerator (for the worker count), --project, --dry-run; every flag is also DIT_TPU_<FLAG>.

# shellcheck source=/dev/null
source "$(dirname "$0")/lib.sh"
parse_flags "$@"
setup_workers
