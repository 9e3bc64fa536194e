"""Running the project's commands from tests: their command lines, processes on simulated CPU devices,
the notebook in a fresh kernel, and JAX's persistent compilation cache shared with subprocesses."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main_command(workdir, *flags: str) -> list[str]:
    """``python -m dit_jax.main`` on configs/default.py writing to ``workdir``, with ``flags`` added."""
    return [sys.executable, "-m", "dit_jax.main", "--config", "configs/default.py", "--workdir", str(workdir), *flags]


def sample_command(*args: str) -> list[str]:
    """``python -m dit_jax.sample ARGS`` with this interpreter."""
    return [sys.executable, "-m", "dit_jax.sample", *args]


def run_processes(commands: list[list[str]], *, timeout: float) -> list[str]:
    """Each command as a process on 4 simulated CPU devices (a host of a multi-host run), all at
    once; their standard outputs once all exit 0. None outlives the call (the partner of a failed
    process would wait for it)."""
    import subprocess

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for command in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def free_port() -> str:
    """A localhost TCP port nothing listens on now: the coordinator of a multi-process test."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


@contextlib.contextmanager
def persistent_compile_cache(directory: Path) -> Iterator[dict[str, str]]:
    """JAX's persistent compilation cache in ``directory`` for every compile (also for subprocesses given the
    returned environment), restoring the previous settings after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")
    values = (str(directory), 0, 0)
    saved = [getattr(jax.config, name) for name in options]
    for name, value in zip(options, values):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield {name.upper(): str(value) for name, value in zip(options, values)}
    finally:
        for name, value in zip(options, saved):
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def execute_notebook(notebook: Path, out_dir: Path, **parameters: Any):
    """Run ``notebook`` with papermill (parameters injected after its ``parameters`` cell) in a fresh
    ``python3`` kernel working in ``out_dir``, which inherits this environment; returns the executed notebook."""
    import nbformat
    import papermill

    out = out_dir / notebook.name
    papermill.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name="python3",
                               cwd=str(out_dir), progress_bar=False, execution_timeout=600)
    return nbformat.read(out, as_version=4)
