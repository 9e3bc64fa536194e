"""The console: library INFO chatter kept off it, and progress lines for long loops."""

from __future__ import annotations

import logging as std_logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import logging

from dit_jax import console


def record(path: str, level: int) -> std_logging.LogRecord:
    return std_logging.LogRecord("absl", level, path, 1, "message", None, None)


RUNTIME_LEVELS = ("TF_CPP_MIN_LOG_LEVEL", "TPU_MIN_LOG_LEVEL", "TPU_STDERR_LOG_LEVEL")


def unset(monkeypatch, *names: str) -> None:
    """Remove ``names`` from the environment for this test (restored after it, also if the code sets them)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_library_info_is_dropped_and_our_own_kept(monkeypatch):
    unset(monkeypatch, *RUNTIME_LEVELS)
    handler = logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", [])
    console.quiet_libraries()
    console.quiet_libraries()  # idempotent
    # TensorFlow's C++ INFO lines and libtpu's start-up lines (to stderr and at all): warnings and errors only.
    assert len(handler.filters) == 1 and {name: os.environ[name] for name in RUNTIME_LEVELS} == dict.fromkeys(
        RUNTIME_LEVELS, "1")
    orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not handler.filter(record(orbax, std_logging.INFO))
    assert handler.filter(record(orbax, std_logging.WARNING))
    assert handler.filter(record(os.path.join(console.PACKAGE_DIR, "train.py"), std_logging.INFO))


def test_verbosity_1_keeps_everything_and_a_users_setting_wins(monkeypatch):
    handler = logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", [])
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setenv("TPU_STDERR_LOG_LEVEL", "0")
    unset(monkeypatch, "TPU_MIN_LOG_LEVEL")
    console.quiet_libraries()
    assert (os.environ["TF_CPP_MIN_LOG_LEVEL"], os.environ["TPU_STDERR_LOG_LEVEL"]) == ("0", "0")
    assert os.environ["TPU_MIN_LOG_LEVEL"] == "1"
    monkeypatch.setattr(handler, "filters", [])
    unset(monkeypatch, *RUNTIME_LEVELS)
    monkeypatch.setattr(logging, "get_verbosity", lambda: 1)
    console.quiet_libraries()
    assert handler.filters == [] and not set(RUNTIME_LEVELS) & set(os.environ)


def test_no_command_starts_the_jax_backend_at_import():
    """libtpu reads its levels when JAX loads it (the backend's start): after ``quiet_libraries``, first in ``main``."""
    commands = ("main", "sample", "evaluate", "reference_batch", "extract_latents", "export", "benchmark", "sweep",
                "model_stats", "parity")
    code = ("import importlib; from jax._src import xla_bridge\n"
            f"for name in {commands!r}:\n"
            "    importlib.import_module('dit_jax.' + name)\n"
            "    assert not xla_bridge.backends_are_initialized(), name\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fail_is_one_error_line_and_the_status(capsys):
    with pytest.raises(SystemExit) as user:
        console.fail("no such folder")
    assert user.value.code == 2 and capsys.readouterr().err == "error: no such folder\n"
    with pytest.raises(SystemExit) as run:
        console.fail("not finite", 1)
    assert run.value.code == 1


def test_a_progress_line_every_30_seconds_and_at_the_end(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(console.time, "time", lambda: now[0])
    with caplog.at_level(std_logging.INFO):
        progress = console.ProgressLog("fid at step 5", 100, "images")
        for _ in range(10):  # 10 blocks of 10 images, 10 s each
            now[0] += 10
            progress.update(10)
    assert [r.getMessage() for r in caplog.records] == [
        "fid at step 5: 100 images to do",
        "fid at step 5: 30/100 images, 1 images/s, 0:01:10 left",
        "fid at step 5: 60/100 images, 1 images/s, 0:00:40 left",
        "fid at step 5: 90/100 images, 1 images/s, 0:00:10 left",
        "fid at step 5: 100/100 images, 1 images/s, 0:00:00 left"]


def test_the_training_line_counts_time_left_past_a_day():
    """A paper-length run has days left: the line's clock keeps counting hours (no wrap at 24 h)."""
    from dit_jax import train

    record = {"step": 1000, "loss": 0.15, "steps_per_sec": 2.5, "images_per_sec": 640.0}
    line = train.progress_line(record, total_steps=7_000_000, seconds=400.0, steps_done=1000)
    assert line.endswith(f", {(7_000_000 - 1000) * 400 // 1000 // 3600}:{(6_999_000 * 400 // 1000) // 60 % 60:02d}:"
                         f"{6_999_000 * 400 // 1000 % 60:02d} left"), line
    assert line.startswith("step 1000/7000000: loss 0.1500, 2.5 steps/s, 640 img/s")
