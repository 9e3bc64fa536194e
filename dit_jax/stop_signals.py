"""Stopping a training run cleanly on SIGTERM (a preemption notice) or Ctrl-C: the loop checkpoints the
current step and stops; a second Ctrl-C quits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

import jax

# The signals that stop a run cleanly (checkpoint the current step, stop): a preemption notice and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Which stop signal arrived (``signum``; None: none yet), set from the signal handler."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None


def signal_name(request: StopRequest) -> str:
    """How a stop is named in the log: Ctrl-C, or SIGTERM (also JAX's preemption notice of a multi-process run)."""
    return "Ctrl-C" if request.signum == signal.SIGINT else "SIGTERM"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """A ``StopRequest`` set by SIGTERM (a preemption notice) or SIGINT (Ctrl-C), so the loop can checkpoint
    the current step and stop cleanly.

    A second Ctrl-C quits at once (status 130): a checkpoint being written then is never committed
    (Orbax commits a step by one rename or a last commit file, only once all of it is written), and
    the next run sets its partial write aside and resumes from the last committed step. Multi-process
    runs leave SIGTERM to JAX's preemption service (``manager.reached_preemption``) and Ctrl-C to Python.
    """
    request = StopRequest()
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.is_set() and signum == signal.SIGINT:
            print("error: Ctrl-C again: quitting at once; a checkpoint being written is not committed and is set "
                  "aside by the next run, which resumes from the last committed step", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)
        request.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
