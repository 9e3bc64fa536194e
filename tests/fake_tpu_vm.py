"""A fake Cloud TPU for the launch/ scripts and JAX's TPU-VM detection: ``gcloud`` (``fake_gcloud.py`` on
``PATH``), the GCE metadata server, TPU chips on the PCI bus, and the tools a worker's setup fetches."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"


class FakeGcloud:
    """``tests/fake_gcloud.py`` installed as ``gcloud`` first on ``PATH``, with its state and call log.

    ``run(script, *args)`` runs ``launch/<script>`` against it; ``calls()`` are the argument lists
    it received (each after ``gcloud``), ``state`` its project (see ``fake_gcloud.py``).
    """

    def __init__(self, root: Path, **state: Any):
        import sys

        self.root, self.bin = root, root / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.log, self.state_path = root / "gcloud_calls.jsonl", root / "gcloud_state.json"
        self.log.write_text("")
        self.state = {"qr": {}, "node": {}, **state}
        shim = self.bin / "gcloud"
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / 'fake_gcloud.py'} \"$@\"\n")
        shim.chmod(0o755)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self.state_path.write_text(json.dumps(value))

    def update(self, **changes: Any) -> None:
        self.state = {**self.state, **changes}

    def env(self, **extra: str) -> dict[str, str]:
        # Not DIT_TPU_* (the scripts' flags), nor what importing jax here set (no TPU chips: skip the metadata).
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIT_TPU_") and k != "TPU_SKIP_MDS_QUERY"}
        env.update(PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log),
                   FAKE_GCLOUD_STATE=str(self.state_path), DIT_TPU_POLL="0", DIT_TPU_LOG_DIR=str(self.root / "logs"))
        env.update(extra)
        return env

    def run(self, script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        import subprocess

        return subprocess.run(["bash", str(LAUNCH_DIR / script), *args], cwd=self.root, env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def clear(self) -> None:
        self.log.write_text("")


class FakeMetadataServer:
    """A GCE metadata server on 127.0.0.1 answering ``/computeMetadata/v1/instance/attributes/<key>``
    (what JAX's TPU-VM cluster detection reads; point it here with ``GCE_METADATA_IP=self.address``)."""

    def __init__(self, attributes: dict[str, str]):
        import http.server
        import threading

        prefix = "/computeMetadata/v1/instance/attributes/"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                key = self.path[len(prefix):] if self.path.startswith(prefix) else None
                ok = key in attributes and self.headers.get("Metadata-Flavor") == "Google"
                body = (attributes[key] if ok else "not found").encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tpu_vm_metadata(worker: int, num_workers: int, accelerator: str = "v4-16") -> dict[str, str]:
    """The metadata attributes a TPU VM worker of a ``gcloud compute tpus`` slice has (as JAX reads them)."""
    endpoints = ",".join(f"unknown:{i}:127.0.0.1" for i in range(num_workers))  # name:id:ip triples
    env = f"ACCELERATOR_TYPE: '{accelerator}'\nWORKER_ID: '{worker}'\nZONE: 'fake-zone'\n"
    return {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints, "tpu-env": env}


def fake_tpu_chips(root: Path, chips: int = 4) -> list[str] | None:
    """A command prefix that runs a command where ``/sys/bus/pci/devices`` also lists ``chips`` TPU v4
    chips (Google's PCI vendor id and the v4 device id, as JAX's hardware probe reads them), in a user
    and mount namespace; None where unprivileged namespaces are not allowed."""
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    real = Path("/sys/bus/pci/devices")
    for entry in real.iterdir() if real.exists() else []:  # the machine's own devices stay (gloo reads its NIC's)
        (root / entry.name).symlink_to(entry.resolve())
    for i in range(chips):
        device = root / f"fffe:00:{i:02x}.0"  # a PCI domain no real device uses
        device.mkdir(parents=True, exist_ok=True)
        (device / "vendor").write_text("0x1ae0\n")
        (device / "device").write_text("0x005e\n")
        (device / "class").write_text("0x120000\n")  # a processing accelerator (gloo reads every device's class)
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c",
              f'mount --bind "{root}" /sys/bus/pci/devices && exec "$@"', "fake-tpu-vm"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else None


def fake_worker_tools(bin_dir: Path, python: str) -> Path:
    """Offline stand-ins on a fake worker's PATH for what setup fetches from the network: ``uv``
    (``uv venv DIR`` makes DIR/bin/python run ``python``; ``uv pip ...`` only records its arguments
    in ``~/uv_calls``) and ``gcsfuse`` / ``mountpoint`` (a mount is a ``.mounted`` marker file)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {
        "uv": f"""#!/bin/sh
echo "$*" >> "$HOME/uv_calls"
if [ "$1" = venv ]; then
    for last in "$@"; do :; done
    mkdir -p "$last/bin" && printf '#!/bin/sh\\nexec {python} "$@"\\n' > "$last/bin/python" && chmod +x "$last/bin/python"
fi
""",
        "gcsfuse": '#!/bin/sh\necho "$*" >> "$HOME/gcsfuse_calls"; for last in "$@"; do :; done; touch "$last/.mounted"\n',
        "mountpoint": '#!/bin/sh\nfor last in "$@"; do :; done; [ -e "$last/.mounted" ]\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir
