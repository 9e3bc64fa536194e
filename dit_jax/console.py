"""What a command prints: its own lines at INFO, the libraries' chatter at WARNING unless ``--verbosity`` asks.

Orbax logs ~40 INFO lines per checkpoint, CLU, grain and TensorStore more, and TensorFlow's C++
runtime its oneDNN notice at import. Every command calls ``quiet_libraries`` first in its ``main``
(after absl has parsed ``--verbosity``): INFO records from files outside this package are dropped
from the console, and ``TF_CPP_MIN_LOG_LEVEL`` is set to 1 (warnings and errors; TensorFlow is
imported only later) unless the user set it. ``--verbosity=1`` keeps everything, as absl prints it.

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
# Read by TensorFlow's (and XLA's) C++ logging when first imported: 1 drops INFO, keeps warnings and errors.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "1"}


class _OwnInfoOnly(std_logging.Filter):
    """Passes warnings and errors, and INFO (or DEBUG) records only from this package's files."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(PACKAGE_DIR)


def quiet_libraries() -> None:
    """Keep the libraries' INFO chatter off the console (and TensorFlow's C++ INFO lines), unless absl's
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
