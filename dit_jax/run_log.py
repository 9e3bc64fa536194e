"""The run's logs, ``metrics.jsonl`` and TensorBoard event files: derived data, rewound on resume.

A resumed run retrains the steps after its checkpoint, so it drops what an earlier run logged
for them: the JSON lines (``read_history``, then ``rewrite``) and the TensorBoard events
(``rewind_event_files``), so each step appears once. Damage (a line half-written by a kill)
is dropped with a warning; it is never a reason to stop a run whose checkpoints are intact.

The files may be in a bucket (``dit_jax.storage``): there a rewrite is one object upload, and
``metrics.jsonl``, opened for appending, is uploaded again whole at each flush (TensorFlow's
GCS files have no append), so a kill keeps the lines flushed before it.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import AbstractContextManager
from typing import IO, Any

from absl import logging

from dit_jax import storage

EVENT_FILES = "events.out.tfevents.*"
# The workdir's records besides its checkpoints: a line per log window and evaluation; the latest invocation's
# config (each checkpoint holds its own, for resuming); the finished run's figures.
METRICS_FILE, CONFIG_FILE, SUMMARY_FILE = "metrics.jsonl", "config.json", "summary.json"


def read_history(path: storage.PathLike, *, up_to_step: int) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` up to ``up_to_step``; a missing file is empty, damaged lines are dropped."""
    if not storage.path(path).exists():
        return []
    lines = [line for line in storage.path(path).read_text().splitlines() if line.strip()]
    history = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            where = "its last line" if number == len(lines) else f"line {number}"
            logging.warning("%s: dropping %s, which is damaged (half-written when a run was killed?): %r", path,
                            where, line[:80])
            continue
        if step <= up_to_step:
            history.append(record)
    return history


def rewrite(path: storage.PathLike, history: list[dict[str, Any]]) -> AbstractContextManager[IO[str]]:
    """Replace ``path`` with ``history`` atomically (a kill leaves the old or the new file); the file open for
    appending, as a context (``with rewrite(...) as log``)."""
    storage.write_atomic(path, "".join(json.dumps(h) + "\n" for h in history))
    return storage.path(path).open("a")


def rewind_event_files(workdir: storage.PathLike, step: int) -> None:
    """Drop the TensorBoard events after ``step`` from the event files in ``workdir`` (each rewritten atomically)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(storage.path(workdir).glob(EVENT_FILES)):
        records = list(RawEventFileLoader(os.fspath(path)).Load())
        keep = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(keep) == len(records):
            continue
        buffer = io.BytesIO()
        writer = RecordWriter(buffer)
        for record in keep:
            writer.write(record)
        storage.write_atomic(path, buffer.getvalue())
        logging.info("%s: dropped %d TensorBoard events after step %d (the resumed run logs those steps again)",
                     path, len(records) - len(keep), step)
