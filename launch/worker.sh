#!/usr/bin/env bash
# Runs on every TPU VM worker (launch/setup.sh copies it to ~/dit_jax_worker.sh):
#
#   worker.sh setup                       the environment, from DIT_* variables (idempotent)
#   worker.sh start RUN PLATFORMS MODULE [ARGS...]
#                                         start `python -m dit_jax.MODULE ARGS` in the background
#                                         (in ~/dit_jax; a leading ~/ in an argument is the home)
#   worker.sh wait RUN                    stream the run's log until it ends; exit with its status
#   worker.sh stop RUN [GRACE]            SIGTERM it (it checkpoints), SIGKILL after GRACE seconds
#   worker.sh status [RUN]                running / exited N / none, per run
#   worker.sh logs [RUN] [--follow]       the run's log (default: the newest run)
#
# Layout under $HOME: dit_jax/ (the project), dit_jax_venv/ (Python >= 3.11, jax[tpu] at the
# project's pin), dit_jax_runs/RUN/{cmd,log,pid,child.pid,rc}.

set -euo pipefail

SELF=$(readlink -f "$0")
PROJECT=$HOME/dit_jax
VENV=$HOME/dit_jax_venv
RUNS=$HOME/dit_jax_runs
UV_VERSION=0.13.8

say() { echo "[$(hostname) $(date -u +%H:%M:%S)] $*" >&2; }
die() { say "error: $*"; exit 2; }

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

find_uv() {  # uv on PATH, in ~/.local/bin, or installed there (pip --user, else Astral's installer)
    local uv
    uv=$(command -v uv || true)
    [[ -z $uv && -x $HOME/.local/bin/uv ]] && uv=$HOME/.local/bin/uv
    if [[ -z $uv ]]; then
        say "installing uv $UV_VERSION"
        python3 -m pip install --user --quiet "uv==$UV_VERSION" 2>/dev/null ||
            curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" | env UV_UNMANAGED_INSTALL="$HOME/.local/bin" sh
        uv=$HOME/.local/bin/uv
    fi
    echo "$uv"
}

setup_project() {
    if [[ -f $HOME/dit_jax_source.tar.gz ]]; then  # the launcher's local tree
        rm -rf "$PROJECT.new"
        mkdir -p "$PROJECT.new"
        tar -xzf "$HOME/dit_jax_source.tar.gz" -C "$PROJECT.new"
        rm -rf "$PROJECT"
        mv "$PROJECT.new" "$PROJECT"
        rm -f "$HOME/dit_jax_source.tar.gz"
        say "project: the launcher's local tree"
    elif [[ -n ${DIT_REPO:-} ]]; then
        [[ -d $PROJECT/.git ]] || git clone --quiet "$DIT_REPO" "$PROJECT"
        git -C "$PROJECT" fetch --quiet origin "${DIT_REF:-main}"
        git -C "$PROJECT" checkout --quiet --force --detach FETCH_HEAD
        say "project: $DIT_REPO at ${DIT_REF:-main} ($(git -C "$PROJECT" rev-parse --short HEAD))"
    fi
    [[ -f $PROJECT/requirements.txt ]] || die "no project in $PROJECT: run launch/setup.sh with --source=local or --source=git"
}

setup_python() {
    local uv
    uv=$(find_uv)
    if [[ ! -x $VENV/bin/python ]] || ! python_ok "$VENV/bin/python"; then
        # The TPU VM images ship Python 3.10; uv uses a system 3.11+ if there is one, else fetches one.
        rm -rf "$VENV"
        "$uv" venv --quiet --seed --python "${DIT_PYTHON:-3.11}" "$VENV"
    fi
    python_ok "$VENV/bin/python" || die "$VENV/bin/python is older than 3.11"
    local want
    want="jax[tpu]==$DIT_JAX_VERSION $(cat "$PROJECT/requirements.txt" "$PROJECT/setup.py" | sha256sum | cut -c1-16)"
    if [[ $(cat "$VENV/.dit_jax_installed" 2>/dev/null) != "$want" ]]; then
        grep -v '^jax\[' "$PROJECT/requirements.txt" >"$VENV/requirements-tpu.txt"
        "$uv" pip install --quiet --python "$VENV/bin/python" "jax[tpu]==$DIT_JAX_VERSION" -r "$VENV/requirements-tpu.txt"
        "$uv" pip install --quiet --python "$VENV/bin/python" --no-deps -e "$PROJECT"
        echo "$want" >"$VENV/.dit_jax_installed"
    fi
    say "python: $("$VENV/bin/python" -V 2>&1), $want"
}

setup_gcsfuse() {
    [[ -n ${DIT_GCS_BUCKET:-} ]] || return 0
    local dir=${DIT_MOUNT_DIR:-gcs}
    [[ $dir == /* ]] || dir=$HOME/$dir
    if ! command -v gcsfuse >/dev/null; then
        say "installing gcsfuse"
        local release
        release=$(lsb_release -cs)
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
            sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg
        echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-$release main" |
            sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
        sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    mkdir -p "$dir"
    if mountpoint -q "$dir"; then
        say "gs://${DIT_GCS_BUCKET#gs://} already mounted at $dir"
    else
        # Directory renames (how Orbax commits a checkpoint) are refused by gcsfuse unless allowed.
        gcsfuse --implicit-dirs --rename-dir-limit=1000000 "${DIT_GCS_BUCKET#gs://}" "$dir"
        say "gs://${DIT_GCS_BUCKET#gs://} mounted at $dir"
    fi
}

setup_latents() {
    [[ -n ${DIT_LATENTS_SRC:-} ]] || return 0
    local dir=${DIT_LATENTS_DIR:-latents}
    [[ $dir == /* ]] || dir=$HOME/$dir
    mkdir -p "$dir"
    if [[ $DIT_LATENTS_SRC == gs://* ]]; then
        gcloud storage rsync --recursive --quiet "$DIT_LATENTS_SRC" "$dir"  # copies only what is missing or changed
    else
        cp -a "${DIT_LATENTS_SRC%/}/." "$dir/"
    fi
    say "latents: $DIT_LATENTS_SRC copied to $dir ($(du -sh "$dir" | cut -f1))"
}

setup() {
    [[ -n ${DIT_JAX_VERSION:-} ]] || die "DIT_JAX_VERSION is not set (launch/setup.sh passes it)"
    setup_project
    setup_python
    setup_gcsfuse
    setup_latents
}

run_dir() { [[ -n ${1:-} ]] || die "which run? (a run id)"; echo "$RUNS/$1"; }

alive() { [[ -f $1/pid ]] && [[ ! -f $1/rc ]] && kill -0 "$(cat "$1/pid")" 2>/dev/null; }

start() {
    (($# >= 3)) || die "usage: worker.sh start RUN PLATFORMS MODULE [ARGS...]"
    local dir platforms=$2 module=$3
    dir=$(run_dir "$1")
    shift 3
    if alive "$dir"; then say "run $(basename "$dir") is already running"; return 0; fi
    [[ -x $VENV/bin/python ]] || die "no $VENV: run launch/setup.sh first"
    rm -rf "$dir"
    mkdir -p "$dir"
    local args=() arg
    for arg in "$@"; do  # ~/ (alone or after --flag=) is this worker's home, as the user meant it
        # shellcheck disable=SC2088  # a literal ~/ that the user quoted for us
        [[ $arg == "~/"* ]] && arg=$HOME/${arg#"~/"}
        [[ $arg == --*"=~/"* ]] && arg=${arg%%=*}=$HOME/${arg#*=~/}
        args+=("$arg")
    done
    local cmd=(env JAX_PLATFORMS="$platforms" "$VENV/bin/python" -m "dit_jax.$module" "${args[@]}")
    printf '%q ' "${cmd[@]}" >"$dir/cmd"
    cd "$PROJECT"
    # Its own session, so an ssh disconnect does not end it and stop can signal the whole group.
    setsid bash "$SELF" _supervise "$dir" "${cmd[@]}" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/pid"
    say "started run $(basename "$dir"): ${cmd[*]}"
}

_supervise() {  # run the command, forward SIGTERM to it, record its exit status in rc
    local dir=$1 child rc
    shift
    "$@" >>"$dir/log" 2>&1 &
    child=$!
    echo "$child" >"$dir/child.pid"
    trap 'kill -TERM "$child" 2>/dev/null' TERM INT
    while :; do
        rc=0
        wait "$child" || rc=$?
        kill -0 "$child" 2>/dev/null || break
    done
    echo "$rc" >"$dir/rc.tmp"
    mv "$dir/rc.tmp" "$dir/rc"
}

wait_run() {
    local dir
    dir=$(run_dir "${1:-}")
    [[ -f $dir/pid ]] || die "no run $1 on this worker"
    tail -n +1 -F --pid="$(cat "$dir/pid")" "$dir/log" 2>/dev/null || true
    while kill -0 "$(cat "$dir/pid")" 2>/dev/null; do sleep 1; done
    [[ -f $dir/rc ]] || { say "run $1 ended without an exit status (killed)"; exit 137; }
    exit "$(cat "$dir/rc")"
}

stop() {
    local dir grace=${2:-120} pid
    dir=$(run_dir "${1:-}")
    alive "$dir" || return 0
    pid=$(cat "$dir/pid")
    say "stopping run $1 (SIGTERM; SIGKILL in ${grace}s)"
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while alive "$dir" && ((waited < grace)); do sleep 1; waited=$((waited + 1)); done
    if alive "$dir"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
}

status() {
    local dirs=() dir
    # shellcheck disable=SC2012  # run ids are plain words; ls sorts them by time
    if [[ -n ${1:-} ]]; then dirs=("$(run_dir "$1")"); else mapfile -t dirs < <(ls -1td "$RUNS"/*/ 2>/dev/null); fi
    ((${#dirs[@]})) || { echo "$(hostname): no runs"; return 0; }
    for dir in "${dirs[@]}"; do
        dir=${dir%/}
        if alive "$dir"; then echo "$(hostname) $(basename "$dir"): running (pid $(cat "$dir/pid"))"
        elif [[ -f $dir/rc ]]; then echo "$(hostname) $(basename "$dir"): exited $(cat "$dir/rc")"
        else echo "$(hostname) $(basename "$dir"): none"; fi
    done
}

logs() {
    local run=${1:-} dir
    [[ $run == --follow ]] && run=""
    # shellcheck disable=SC2012  # run ids are plain words; ls sorts them by time
    [[ -n $run ]] || run=$(basename "$(ls -1td "$RUNS"/*/ 2>/dev/null | head -n 1)")
    dir=$(run_dir "$run")
    [[ -f $dir/log ]] || die "no log for run $run"
    if [[ " $* " == *" --follow "* ]]; then tail -n +1 -F --pid="$(cat "$dir/pid")" "$dir/log"; else cat "$dir/log"; fi
}

case ${1:-} in
    setup) setup ;;
    start) shift; start "$@" ;;
    _supervise) shift; _supervise "$@" ;;
    wait) wait_run "${2:-}" ;;
    stop) stop "${2:-}" "${3:-120}" ;;
    status) status "${2:-}" ;;
    logs) shift; logs "$@" ;;
    *) sed -n '2,/^$/{s/^# \{0,1\}//p}' "$0"; exit 2 ;;
esac
