"""A recording, stateful fake of the ``gcloud compute tpus`` commands the launch/ scripts use.

Installed as ``gcloud`` first on ``PATH`` by ``tests/fake_tpu_vm.py`` (``FakeGcloud``). Standard library
only (it runs for every gcloud call). Environment:

- ``FAKE_GCLOUD_LOG``: each call's arguments (after ``gcloud``) are appended as one JSON line;
- ``FAKE_GCLOUD_STATE``: a JSON file holding the fake project (read and written under a lock):

  ``qr`` / ``node``: name -> state of queued resources / TPU nodes; ``on_create``: the states a
  create gives (``{"qr": "ACTIVE", "node": "READY"}``); ``pending``: how many describes after a
  create answer ``PROVISIONING`` / ``CREATING`` first; ``script``: ssh outcomes consumed in
  order by the first command containing their ``match`` (``{"match": "wait", "rc": 143,
  "set": {"node": {"dit": "PREEMPTED"}}, "until": "stop"}``: ``until`` blocks until a call whose
  command contains that text has been made); ``workers``: when set, ``ssh`` runs the command and
  ``scp`` copies for real, per worker: ``{"home": DIR, "env": {...}, "wrap": [ARGV...]}``
  (``create`` empties the homes, as a new slice has fresh disks); ``env_from_state`` names
  state keys added to each worker's environment (``JAX_COORDINATOR_PORT``: a free port each
  create picks).

A stopped node (any state but READY) refuses ssh with status 255, as the real one does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

STATE, LOG = os.environ["FAKE_GCLOUD_STATE"], os.environ["FAKE_GCLOUD_LOG"]


@contextlib.contextmanager
def locked_state():
    with open(STATE + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(STATE) as f:
            state = json.load(f)
        yield state
        with open(STATE + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(STATE + ".tmp", STATE)


def read_state() -> dict:
    with open(STATE) as f:
        return json.load(f)


def flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in args if a.startswith("--"))


def fail(message: str, rc: int = 1) -> None:
    print(f"ERROR: (gcloud.fake) {message}", file=sys.stderr)
    raise SystemExit(rc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(state: dict, worker: dict) -> dict[str, str]:
    env = dict(os.environ, HOME=worker["home"], **worker.get("env", {}))
    env.update({key: str(state[key]) for key in state.get("env_from_state", [])})
    for name in ("FAKE_GCLOUD_STATE", "FAKE_GCLOUD_LOG"):
        env.pop(name)
    return env


def run_on(state: dict, worker: dict, command: str) -> int:
    argv = [*worker.get("wrap", []), "bash", "-c", command]
    return subprocess.run(argv, cwd=worker["home"], env=worker_env(state, worker)).returncode


def selected(state: dict, worker_flag: str) -> list[dict]:
    workers = state["workers"]
    return workers if worker_flag == "all" else [workers[int(worker_flag or 0)]]


def ssh(name: str, opts: dict[str, str]) -> int:
    command = opts.get("command", "")
    with locked_state() as state:
        if state["node"].get(name) != "READY":
            print(f"ssh: connect to host {name}: Connection timed out", file=sys.stderr)
            return 255
        state.setdefault("commands", []).append(command)
        outcome = next((o for o in state.get("script", []) if o["match"] in command), None)
        if outcome is not None:
            state["script"].remove(outcome)
    if outcome is not None:
        while outcome.get("until"):
            with locked_state() as state:
                if any(outcome["until"] in c for c in state["commands"]):
                    break
            time.sleep(0.05)
        with locked_state() as state:
            for kind, values in outcome.get("set", {}).items():
                state[kind].update(values)
        sys.stdout.write(outcome.get("stdout", ""))
        return outcome.get("rc", 0)
    state = read_state()
    if not state.get("workers"):
        return 0
    targets = selected(state, opts.get("worker", "0"))
    with ThreadPoolExecutor(len(targets)) as pool:
        codes = list(pool.map(lambda w: run_on(state, w, command), targets))
    return next((c for c in codes if c), 0)


def scp(args: list[str], opts: dict[str, str]) -> int:
    paths = [a for a in args if not a.startswith("--")]
    src, dest = paths[0], paths[-1].split(":", 1)[1]
    state = read_state()
    if state["node"].get(paths[-1].split(":")[0]) != "READY":
        return 255
    for worker in selected(state, opts.get("worker", "0")) if state.get("workers") else []:
        shutil.copy(src, os.path.join(worker["home"], dest))
    return 0


def main(argv: list[str]) -> int:
    with open(LOG, "a") as f:
        f.write(json.dumps(argv) + "\n")
    words = [a for a in argv if not a.startswith("--")]
    if words[:1] == ["alpha"]:
        words = words[1:]
    assert words[:2] == ["compute", "tpus"], argv
    kind, verb, name = words[2], words[3], words[4]
    opts = flags(argv)
    if verb == "ssh":
        return ssh(name, opts)
    if verb == "scp":
        return scp(argv[4:], opts)
    with locked_state() as state:
        table = state["qr"] if kind == "queued-resources" else state["node"]
        if verb == "create":
            if name in table:
                fail(f"ALREADY_EXISTS: {name} exists")
            made = state.get("on_create", {"qr": "ACTIVE", "node": "READY"})
            if kind == "queued-resources":
                state["qr"][name] = made["qr"]
            state["node"][name] = made["node"]
            state["pending_left"] = state.get("pending", 0)
            state["JAX_COORDINATOR_PORT"] = free_port()  # a new slice's coordinator starts afresh
            for worker in state.get("workers") or []:
                shutil.rmtree(worker["home"], ignore_errors=True)
                os.makedirs(worker["home"])
        elif verb == "describe":
            if name not in table:
                fail(f"NOT_FOUND: Resource {name} was not found")
            value = table[name]
            if state.get("pending_left", 0) > 0:
                state["pending_left"] -= 1
                value = "PROVISIONING" if kind == "queued-resources" else "CREATING"
            print(value)
        elif verb == "delete":
            if name not in table:
                fail(f"NOT_FOUND: Resource {name} was not found")
            table.pop(name)
            if kind == "queued-resources":
                state["node"].pop(name, None)
        else:
            fail(f"the fake has no {kind} {verb}", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
