# shellcheck shell=bash
# The shared library of the launch/ scripts: flags, accelerators, the gcloud commands (printed
# on one shell-quoted line under --dry-run), the slice's state, setup, runs and babysitting.
# Each script sources it, calls parse_flags "$@", then one cmd_* function.

set -euo pipefail

# Commands printed under --dry-run go to fd 3, the script's standard output, even from inside $(...).
exec 3>&1

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

# Every flag --foo-bar is also the environment variable DIT_TPU_FOO_BAR (a flag wins).
FLAGS=(NAME ZONE PROJECT ACCELERATOR VERSION MODE CAPACITY WORKERS SOURCE REPO REF GCS_BUCKET MOUNT_DIR
       LATENTS_SRC LATENTS_DIR PLATFORMS PYTHON RUN_ID RETRIES POLL WAIT_TIMEOUT GRACE LOG_DIR WORKER
       EXTRA_CREATE_FLAGS DETACH DRY_RUN FOLLOW)
BOOL_FLAGS=(DETACH DRY_RUN FOLLOW)
ARGS=()

die() { echo "error: $*" >&2; exit 2; }
say() { echo "[launch $(date -u +%H:%M:%S)] $*" >&2; }

usage() {  # the calling script's header comment (its lines starting with "# ", up to the first blank line)
    sed -n '2,/^$/{s/^# \{0,1\}//p}' "$0"
}

_flag_key() { local key=${1#--}; key=${key//-/_}; echo "${key^^}"; }
_is_flag() { local f; for f in "${FLAGS[@]}"; do [[ $f == "$1" ]] && return 0; done; return 1; }
_is_bool() { local f; for f in "${BOOL_FLAGS[@]}"; do [[ $f == "$1" ]] && return 0; done; return 1; }

parse_flags() {
    local key
    while (($#)); do
        case $1 in
            -h|--help) usage; exit 0 ;;
            --) shift; ARGS+=("$@"); break ;;
            --*=*)
                key=$(_flag_key "${1%%=*}")
                _is_flag "$key" || die "unknown flag ${1%%=*} (see $0 --help)"
                printf -v "DIT_TPU_$key" '%s' "${1#*=}" ;;
            --*)
                key=$(_flag_key "$1")
                _is_flag "$key" || die "unknown flag $1 (see $0 --help)"
                if _is_bool "$key"; then
                    printf -v "DIT_TPU_$key" '%s' 1
                else
                    (($# >= 2)) || die "$1 needs a value"
                    printf -v "DIT_TPU_$key" '%s' "$2"
                    shift
                fi ;;
            *) ARGS+=("$1") ;;
        esac
        shift
    done
    _defaults
}

_defaults() {
    : "${DIT_TPU_NAME:=}" "${DIT_TPU_ZONE:=}" "${DIT_TPU_PROJECT:=}" "${DIT_TPU_VERSION:=}" "${DIT_TPU_WORKERS:=}"
    : "${DIT_TPU_ACCELERATOR:=v3-8}" "${DIT_TPU_MODE:=queued}" "${DIT_TPU_CAPACITY:=on-demand}"
    : "${DIT_TPU_SOURCE:=local}" "${DIT_TPU_REPO:=}" "${DIT_TPU_REF:=main}"
    : "${DIT_TPU_GCS_BUCKET:=}" "${DIT_TPU_MOUNT_DIR:=gcs}" "${DIT_TPU_LATENTS_SRC:=}" "${DIT_TPU_LATENTS_DIR:=latents}"
    : "${DIT_TPU_PLATFORMS:=tpu}" "${DIT_TPU_PYTHON:=3.11}" "${DIT_TPU_RUN_ID:=}"
    : "${DIT_TPU_RETRIES:=3}" "${DIT_TPU_POLL:=30}" "${DIT_TPU_WAIT_TIMEOUT:=0}" "${DIT_TPU_GRACE:=120}"
    : "${DIT_TPU_LOG_DIR:=}" "${DIT_TPU_WORKER:=0}" "${DIT_TPU_EXTRA_CREATE_FLAGS:=}"
    : "${DIT_TPU_DETACH:=0}" "${DIT_TPU_DRY_RUN:=0}" "${DIT_TPU_FOLLOW:=0}"
    case $DIT_TPU_MODE in queued|direct) ;; *) die "--mode must be queued or direct, not '$DIT_TPU_MODE'" ;; esac
    case $DIT_TPU_CAPACITY in on-demand|spot|preemptible|reserved|best-effort) ;;
        *) die "--capacity must be on-demand, spot, preemptible, reserved or best-effort, not '$DIT_TPU_CAPACITY'" ;;
    esac
    case $DIT_TPU_SOURCE in local|git) ;; *) die "--source must be local or git, not '$DIT_TPU_SOURCE'" ;; esac
    local n
    for n in RETRIES POLL WAIT_TIMEOUT GRACE; do
        local value="DIT_TPU_$n"
        [[ ${!value} =~ ^[0-9]+$ ]] || die "--$(echo "${n,,}" | tr _ -) must be a whole number, not '${!value}'"
    done
}

require() {  # require NAME ZONE ...: the flags this command cannot do without
    local key var
    for key in "$@"; do
        var="DIT_TPU_$key"
        [[ -n ${!var} ]] || die "--$(echo "${key,,}" | tr _ -) is required (or set $var)"
    done
}

dry_run() { [[ $DIT_TPU_DRY_RUN == 1 ]]; }

log_dir() { echo "${DIT_TPU_LOG_DIR:-runs/tpu/$DIT_TPU_NAME}"; }

# ---------------------------------------------------------------- accelerators

# The TPU software version for an accelerator type (Cloud TPU's table for JAX): v2-v4 run the
# Ubuntu 22.04 base image, v5e, v5p and v6e their own images. --version overrides it.
runtime_version() {
    local accel=${1:-$DIT_TPU_ACCELERATOR}
    if [[ -n $DIT_TPU_VERSION ]]; then echo "$DIT_TPU_VERSION"; return; fi
    _check_accelerator "$accel"
    case $accel in
        v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
        v5litepod-*) echo v2-alpha-tpuv5-lite ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v6e-*) echo v2-alpha-tpuv6e ;;
    esac
}

_check_accelerator() {
    local accel=$1
    [[ $accel =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] ||
        die "unknown accelerator '$accel': use v2-N, v3-N (v3-8 ... v3-2048), v4-N, v5p-N, v5litepod-N (v5e) or v6e-N"
    local family=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
    case $family in
        v2|v3|v4|v5p) ((size >= 8 && size % 8 == 0)) || die "$accel: $family slices come in multiples of 8 cores (e.g. ${family}-8, ${family}-32)" ;;
        *) ((size == 1 || size == 4 || (size >= 8 && size % 4 == 0))) || die "$accel: $family slices have 1, 4, 8 or a multiple of 4 chips" ;;
    esac
}

# Hosts (TPU VM workers) in a slice: v2/v3 have 8 cores and v4/v5p 4 chips (8 cores) per host;
# v5e and v6e have up to 8 chips on one host, 4 per host in larger slices. --workers overrides it.
worker_count() {
    local accel=${1:-$DIT_TPU_ACCELERATOR}
    if [[ -n $DIT_TPU_WORKERS ]]; then echo "$DIT_TPU_WORKERS"; return; fi
    _check_accelerator "$accel"
    local size=${accel##*-}
    case $accel in
        v5litepod-*|v6e-*) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;
        *) echo $((size / 8)) ;;
    esac
}

# ---------------------------------------------------------------- gcloud

shell_join() {  # the arguments as one line a POSIX shell reads back as the same words
    local out=() arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+=("$arg")
        else
            out+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    echo "${out[*]}"
}

_common_flags() {  # appended to every gcloud command
    local flags=(--zone="$DIT_TPU_ZONE")
    [[ -n $DIT_TPU_PROJECT ]] && flags+=(--project="$DIT_TPU_PROJECT")
    flags+=(--quiet)
    printf '%s\n' "${flags[@]}"
}

gc() {  # gc ARGS...: run `gcloud ARGS <zone/project/quiet>`, or print it under --dry-run
    local common
    mapfile -t common < <(_common_flags)
    local argv=(gcloud "$@" "${common[@]}")
    if dry_run; then
        shell_join "${argv[@]}" >&3
        return 0
    fi
    echo "+ $(shell_join "${argv[@]}")" >&2
    "${argv[@]}"
}

_tpus() {  # the command group: best-effort queued resources are in gcloud alpha
    if [[ $DIT_TPU_MODE == queued && $DIT_TPU_CAPACITY == best-effort ]]; then echo "alpha compute tpus"; else echo "compute tpus"; fi
}

create_args() {  # the create command for --mode and --capacity, one word per line
    local accel=$DIT_TPU_ACCELERATOR version group extra=()
    version=$(runtime_version)
    read -ra group <<<"$(_tpus)"
    read -ra extra <<<"$DIT_TPU_EXTRA_CREATE_FLAGS"
    if [[ $DIT_TPU_MODE == queued ]]; then
        local args=("${group[@]}" queued-resources create "$DIT_TPU_NAME" --node-id="$DIT_TPU_NAME"
                    --accelerator-type="$accel" --runtime-version="$version")
        case $DIT_TPU_CAPACITY in
            on-demand) ;;
            spot) args+=(--spot) ;;
            reserved) args+=(--reserved) ;;
            best-effort) args+=(--best-effort) ;;
            preemptible) die "queued resources have no preemptible tier: use --capacity=spot (its successor) or --mode=direct" ;;
        esac
    else
        local args=("${group[@]}" tpu-vm create "$DIT_TPU_NAME" --accelerator-type="$accel" --version="$version")
        case $DIT_TPU_CAPACITY in
            on-demand) ;;
            spot) args+=(--spot) ;;
            preemptible) args+=(--preemptible) ;;
            reserved) args+=(--reserved) ;;
            best-effort) die "best-effort is a queued-resources tier: use --mode=queued" ;;
        esac
    fi
    printf '%s\n' "${args[@]}" "${extra[@]}"
}

# The slice's state, one word: READY, PENDING (being created or queued), PREEMPTED, SUSPENDED,
# FAILED, LOST (stopped, terminated or being deleted), NONE (no such slice) or UNKNOWN (gcloud failed:
# try again). Under --dry-run the describe commands are printed and the state is $1.
slice_state() {
    local assume=${1:-READY} group qr node
    read -ra group <<<"$(_tpus)"
    local qr_describe=("${group[@]}" queued-resources describe "$DIT_TPU_NAME" --format='value(state.state)')
    local node_describe=(compute tpus tpu-vm describe "$DIT_TPU_NAME" --format='value(state)')
    if dry_run; then
        [[ $DIT_TPU_MODE == queued ]] && gc "${qr_describe[@]}"
        [[ $DIT_TPU_MODE == direct || $assume == READY ]] && gc "${node_describe[@]}"
        echo "$assume"
        return
    fi
    if [[ $DIT_TPU_MODE == queued ]]; then
        qr=$(_describe "${qr_describe[@]}") || { echo "$qr"; return; }
        case $qr in
            ACTIVE) ;;  # the node exists: its own state says whether it is usable
            ACCEPTED|PROVISIONING|CREATING|WAITING_FOR_RESOURCES) echo PENDING; return ;;
            SUSPENDING|SUSPENDED) echo SUSPENDED; return ;;
            FAILED) echo FAILED; return ;;
            DELETING) echo LOST; return ;;
            *) echo UNKNOWN; return ;;
        esac
    fi
    node=$(_describe "${node_describe[@]}") || { [[ $node == NONE && $DIT_TPU_MODE == queued ]] && node=LOST; echo "$node"; return; }
    case $node in
        READY) echo READY ;;
        CREATING|STARTING|RESTARTING|REPAIRING) echo PENDING ;;
        PREEMPTED) echo PREEMPTED ;;
        STOPPED|STOPPING|TERMINATED|DELETING|HIDING|HIDDEN|UNHIDING) echo LOST ;;
        *) echo UNKNOWN ;;
    esac
}

_describe() {  # _describe ARGS...: the value gcloud prints, or NONE / UNKNOWN with a failure status
    local out err
    err=$(mktemp)
    if out=$(gc "$@" 2>"$err"); then
        rm -f "$err"
        echo "$out"
        return 0
    fi
    if grep -q "NOT_FOUND" "$err"; then echo NONE; else grep -v '^+ ' "$err" | sed 's/^/  gcloud: /' >&2; echo UNKNOWN; fi
    rm -f "$err"
    return 1
}

# Wait until the slice is READY (0); 1 when it ended up preempted, suspended, lost or absent, 2 on failure.
wait_ready() {
    local start=$SECONDS state
    while :; do
        state=$(slice_state READY)
        case $state in
            READY) say "$DIT_TPU_NAME is ready"; return 0 ;;
            FAILED) say "$DIT_TPU_NAME failed to be created: $(_describe_hint)"; return 2 ;;
            PREEMPTED|SUSPENDED|LOST|NONE) say "$DIT_TPU_NAME is $state"; return 1 ;;
        esac
        if ((DIT_TPU_WAIT_TIMEOUT && SECONDS - start > DIT_TPU_WAIT_TIMEOUT)); then
            say "$DIT_TPU_NAME still $state after ${DIT_TPU_WAIT_TIMEOUT}s: $(_describe_hint)"
            return 2
        fi
        say "$DIT_TPU_NAME is $state; next look in ${DIT_TPU_POLL}s"
        sleep "$DIT_TPU_POLL"
    done
}

_describe_hint() {
    if [[ $DIT_TPU_MODE == queued ]]; then
        echo "see gcloud $(_tpus) queued-resources describe $DIT_TPU_NAME --zone=$DIT_TPU_ZONE (launch/README.md: capacity)"
    else
        echo "see gcloud compute tpus tpu-vm describe $DIT_TPU_NAME --zone=$DIT_TPU_ZONE (launch/README.md: capacity)"
    fi
}

create_slice() {  # create (unless it exists and is usable) and wait until ready; 1/2 as wait_ready
    require NAME ZONE
    local state args
    mapfile -t args < <(create_args)  # first: a bad accelerator or capacity fails before any gcloud call
    ((${#args[@]})) || exit 2         # create_args died: its message is above
    state=$(slice_state NONE)
    case $state in
        READY) say "$DIT_TPU_NAME already exists and is ready"; return 0 ;;
        PENDING|UNKNOWN) wait_ready; return ;;
        NONE) ;;
        *) die "$DIT_TPU_NAME exists in state $state: delete it first (launch/delete.sh), or let launch/babysit.sh replace it" ;;
    esac
    say "creating $DIT_TPU_NAME: $DIT_TPU_ACCELERATOR ($(worker_count) workers), $DIT_TPU_CAPACITY, $DIT_TPU_MODE"
    gc "${args[@]}" || return 2
    wait_ready
}

delete_slice() {  # delete the slice (queued: the request and its node) and wait until it is gone
    require NAME ZONE
    if [[ $DIT_TPU_MODE == queued ]]; then
        local group
        read -ra group <<<"$(_tpus)"
        gc "${group[@]}" queued-resources delete "$DIT_TPU_NAME" --force || true
    else
        gc compute tpus tpu-vm delete "$DIT_TPU_NAME" || true
    fi
    local state
    while :; do
        state=$(slice_state NONE)
        [[ $state == NONE ]] && { say "$DIT_TPU_NAME is deleted"; return 0; }
        say "$DIT_TPU_NAME is $state while being deleted; next look in ${DIT_TPU_POLL}s"
        sleep "$DIT_TPU_POLL"
    done
}

# ---------------------------------------------------------------- setup

jax_version() {  # the project's pinned JAX (requirements.txt's jax[...]==X line)
    local v
    v=$(sed -n 's/^jax\[[a-z0-9,]*\]==\([0-9][0-9.]*\).*/\1/p' "$REPO_ROOT/requirements.txt" | head -n 1)
    [[ -n $v ]] || die "no jax[...]==VERSION line in $REPO_ROOT/requirements.txt"
    echo "$v"
}

source_tarball() {  # the local tree (tracked and untracked files git does not ignore) as a tarball
    local out=$1
    mkdir -p "$(dirname "$out")"
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
        (cd "$REPO_ROOT" && while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done) |
        tar -C "$REPO_ROOT" --null -T - -czf "$out"
}

setup_workers() {  # set up every worker (launch/worker.sh setup); idempotent
    require NAME ZONE
    local env=(env DIT_JAX_VERSION="$(jax_version)" DIT_PYTHON="$DIT_TPU_PYTHON")
    gc compute tpus tpu-vm scp "$LAUNCH_DIR/worker.sh" "$DIT_TPU_NAME:dit_jax_worker.sh" --worker=all || return
    if [[ $DIT_TPU_SOURCE == local ]]; then
        local tarball
        tarball="$(log_dir)/source.tar.gz"
        dry_run || source_tarball "$tarball"
        gc compute tpus tpu-vm scp "$tarball" "$DIT_TPU_NAME:dit_jax_source.tar.gz" --worker=all || return
    else
        local repo=$DIT_TPU_REPO
        [[ -n $repo ]] || repo=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null) ||
            die "--source=git needs --repo URL (this checkout has no origin remote)"
        env+=(DIT_REPO="$repo" DIT_REF="$DIT_TPU_REF")
    fi
    [[ -n $DIT_TPU_GCS_BUCKET ]] && env+=(DIT_GCS_BUCKET="$DIT_TPU_GCS_BUCKET" DIT_MOUNT_DIR="$DIT_TPU_MOUNT_DIR")
    [[ -n $DIT_TPU_LATENTS_SRC ]] && env+=(DIT_LATENTS_SRC="$DIT_TPU_LATENTS_SRC" DIT_LATENTS_DIR="$DIT_TPU_LATENTS_DIR")
    gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker=all \
        --command="$(shell_join "${env[@]}" bash dit_jax_worker.sh setup)"
}

# ---------------------------------------------------------------- runs

new_run_id() { echo "${DIT_TPU_RUN_ID:-run-$(date -u +%Y%m%d-%H%M%S)}"; }

# One status for workers that ended together: a worker's own failure first, then 143 (preempted:
# SIGTERM), then 255 (ssh lost the worker), else 0.
combine_status() {
    local rc first=0 preempted=0 lost=0
    for rc in "$@"; do
        case $rc in 0) ;; 143) preempted=1 ;; 255) lost=1 ;; *) ((first)) || first=$rc ;; esac
    done
    if ((first)); then echo "$first"; elif ((preempted)); then echo 143; elif ((lost)); then echo 255; else echo 0; fi
}

# run_on_workers RUN_ID MODULE ARGS...: start `python -m dit_jax.MODULE ARGS` on all workers at
# once, then (unless --detach) stream each worker's output to LOG_DIR/RUN_ID/worker-N.log; when a
# worker fails the others are stopped. Returns the combined status.
run_on_workers() {
    require NAME ZONE
    local run=$1 module=$2
    shift 2
    [[ $module == train ]] && module=main
    [[ $module =~ ^[a-z_][a-z0-9_]*$ ]] || die "'$module' is not a dit_jax command (e.g. main, extract_latents, sample, evaluate)"
    local n
    n=$(worker_count)
    say "run $run on $n workers: python -m dit_jax.$module $*"
    gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker=all \
        --command="$(shell_join bash dit_jax_worker.sh start "$run" "$DIT_TPU_PLATFORMS" "$module" "$@")" || return
    if [[ $DIT_TPU_DETACH == 1 ]]; then
        say "detached: follow it with launch/logs.sh --name=$DIT_TPU_NAME --run-id=$run --follow, stop it with launch/stop.sh"
        return 0
    fi
    local w wait_cmd
    wait_cmd=$(shell_join bash dit_jax_worker.sh wait "$run")
    if dry_run; then
        for ((w = 0; w < n; w++)); do gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker="$w" --command="$wait_cmd"; done
        return 0
    fi
    local dir
    dir="$(log_dir)/$run"
    mkdir -p "$dir"
    rm -f "$dir"/worker-*.rc
    for ((w = 0; w < n; w++)); do
        (set +e; gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker="$w" --command="$wait_cmd" >"$dir/worker-$w.log" 2>&1
         echo $? >"$dir/worker-$w.rc.tmp" && mv "$dir/worker-$w.rc.tmp" "$dir/worker-$w.rc") &
    done
    local stopped=0 done_count rc f failed=() first=0
    while :; do
        wait -n 2>/dev/null || true
        done_count=0
        failed=()
        for f in "$dir"/worker-*.rc; do
            [[ -e $f ]] || continue
            done_count=$((done_count + 1))
            rc=$(<"$f")
            ((rc != 0)) && failed+=("$rc")
        done
        if ((${#failed[@]} && !stopped)); then
            # The first failure is the run's status (the others then end by our SIGTERM).
            first=$(combine_status "${failed[@]}")
            stopped=1
        fi
        if ((stopped == 1 && done_count < n)); then
            say "a worker exited $first: stopping the others"
            stopped=2
            gc compute tpus tpu-vm ssh "$DIT_TPU_NAME" --worker=all \
                --command="$(shell_join bash dit_jax_worker.sh stop "$run" "$DIT_TPU_GRACE")" >/dev/null 2>&1 || true
        fi
        ((done_count == n)) && break
        jobs -r | grep -q . || sleep 1
    done
    wait
    for ((w = 0; w < n; w++)); do say "worker $w: exit $(<"$dir/worker-$w.rc") (log: $dir/worker-$w.log)"; done
    return "$first"
}

# ---------------------------------------------------------------- babysitting

# Keep COMMAND running until it finishes: whenever the slice is preempted, suspended, lost or
# absent, delete it, create it again, set it up and rerun the command (which resumes from its
# newest checkpoint). Exit 143 (preempted) and lost ssh connections are not failures; any other
# exit is retried up to --retries times, then returned.
babysit() {
    require NAME ZONE
    (($#)) || die "babysit needs a command after --, e.g. -- main --config configs/dit_xl2_256.py --workdir gs://B/run"
    local failures=0 attempt=0 state rc needs_setup=1 base
    base=$(new_run_id)
    while :; do
        state=$(slice_state READY)
        case $state in
            READY) ;;
            PENDING) wait_ready || true; continue ;;
            UNKNOWN) say "cannot read $DIT_TPU_NAME's state; next look in ${DIT_TPU_POLL}s"; sleep "$DIT_TPU_POLL"; continue ;;
            NONE) say "$DIT_TPU_NAME does not exist: creating it"
                  create_slice || rc=$?; needs_setup=1; dry_run || continue ;;
            *) say "$DIT_TPU_NAME is $state: deleting and creating it again"
               delete_slice; create_slice || true; needs_setup=1; dry_run || continue ;;
        esac
        if ((needs_setup)); then
            if setup_workers; then needs_setup=0; else
                rc=$?
                failures=$((failures + 1))
                say "setup failed ($rc), failure $failures of $((DIT_TPU_RETRIES + 1))"
                ((failures > DIT_TPU_RETRIES)) && return "$rc"
                sleep "$DIT_TPU_POLL"
                continue
            fi
        fi
        attempt=$((attempt + 1))
        rc=0
        run_on_workers "$base-$attempt" "$@" || rc=$?
        dry_run && return 0
        case $rc in
            0) say "done"; return 0 ;;
            143) say "preempted (exit 143): resuming" ;;
            255) say "lost the ssh connection to a worker"
                 if [[ $(slice_state READY) == READY ]]; then
                     failures=$((failures + 1))
                     say "the slice is ready: failure $failures of $((DIT_TPU_RETRIES + 1))"
                     ((failures > DIT_TPU_RETRIES)) && return "$rc"
                 fi ;;
            *) failures=$((failures + 1))
               say "exit $rc: failure $failures of $((DIT_TPU_RETRIES + 1))"
               ((failures > DIT_TPU_RETRIES)) && return "$rc" ;;
        esac
        sleep "$DIT_TPU_POLL"
    done
}
