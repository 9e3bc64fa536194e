"""What a command prints: its own lines at INFO, the libraries' chatter at WARNING unless ``--verbosity`` asks.

Orbax logs ~40 INFO lines per checkpoint, CLU, grain and TensorStore more, TensorFlow's C++
runtime its oneDNN notice at import, and libtpu its start-up lines on a TPU VM. Every command
calls ``quiet_libraries`` first in its ``main`` (after absl has parsed ``--verbosity``): INFO
records from files outside this package are dropped from the console, and the C++ runtimes'
levels (``QUIET_ENVIRONMENT``) are set to 1 (warnings and errors) unless the user set them. Both
runtimes read them when loaded, later: TensorFlow is imported only later, and libtpu is loaded when
JAX first initialises its backend, which no command module does at import. ``--verbosity=1``
keeps everything, as absl and the runtimes print it.

A command ends on an error with ``fail``: one line, status 2 for what the user must fix (a path, a flag,
a file), 1 for a failure of the run itself.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time
from typing import NoReturn

from absl import logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Read when each runtime is loaded; 1 drops INFO, keeps warnings and errors. TF_CPP_MIN_LOG_LEVEL: TensorFlow's
# (and XLA's) C++ logging. TPU_MIN_LOG_LEVEL: what libtpu logs at all (its lines before its logging starts go to
# stderr; also its files in /tmp/tpu_logs); TPU_STDERR_LOG_LEVEL: what of that it copies to stderr.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "1", "TPU_MIN_LOG_LEVEL": "1", "TPU_STDERR_LOG_LEVEL": "1"}


class _OwnInfoOnly(std_logging.Filter):
    """Passes warnings and errors, and INFO (or DEBUG) records only from this package's files."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


def quiet_libraries() -> None:
    """Keep the libraries' INFO chatter off the console (and TensorFlow's and libtpu's C++ INFO lines), unless absl's
    ``--verbosity`` is 1 or more. Idempotent; call it first in a command's ``main``."""
    if logging.get_verbosity() >= 1:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())


def fail(message: str, status: int = 2) -> NoReturn:
    """Print ``message`` as the command's one error line (``error: ...`` on stderr) and exit with ``status``
    (2: the user's to fix; 1: the run itself failed)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """Log lines ``what: done/total unit, rate, time left`` for a long loop where a bar does not suit (a training
    log): at most one every ``every_seconds`` (30: a line at least twice a minute while work goes on), and the last."""

    def __init__(self, what: str, total: int, unit: str, every_seconds: float = 30.0) -> None:
        self.what, self.total, self.unit, self.every_seconds = what, total, unit, every_seconds
        self.start = self.last = time.time()
        self.done = 0
        logging.info("%s: %d %s to do", what, total, unit)

    def update(self, count: int) -> None:
        """``count`` more done; logs a line if ``every_seconds`` have passed since the last one, or all are done."""
        self.done += count
        now = time.time()
        if now - self.last < self.every_seconds and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        logging.info("%s: %d/%d %s, %.3g %s/s, %s left", self.what, self.done, self.total, self.unit, rate, self.unit,
                     clock((self.total - self.done) / rate))
