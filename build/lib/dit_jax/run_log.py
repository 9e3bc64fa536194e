"""The run's logs, ``metrics.jsonl`` and TensorBoard event files: derived data, rewound on resume.

A resumed run retrains the steps after its checkpoint, so it drops what an earlier run logged
for them: the JSON lines (``read_history``, then ``rewrite``) and the TensorBoard events
(``rewind_event_files``), so each step appears once. Damage (a line half-written by a kill)
is dropped with a warning; it is never a reason to stop a run whose checkpoints are intact.
"""

from __future__ import annotations

import glob
import json
import os
from typing import IO, Any

from absl import logging

EVENT_FILES = "events.out.tfevents.*"


def read_history(path: str, *, up_to_step: int) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` up to ``up_to_step``; a missing file is empty, damaged lines are dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
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


def rewrite(path: str, history: list[dict[str, Any]]) -> IO[str]:
    """Replace ``path`` with ``history`` atomically (a kill leaves the old or the new file), open for appending."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def rewind_event_files(workdir: str, step: int) -> None:
    """Drop the TensorBoard events after ``step`` from the event files in ``workdir`` (each rewritten atomically)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(glob.glob(os.path.join(workdir, EVENT_FILES))):
        records = list(RawEventFileLoader(path).Load())
        keep = [r for r in records if event_pb2.Event.FromString(r).step <= step]
        if len(keep) == len(records):
            continue
        with open(path + ".tmp", "wb") as f:
            writer = RecordWriter(f)
            for record in keep:
                writer.write(record)
        os.replace(path + ".tmp", path)
        logging.info("%s: dropped %d TensorBoard events after step %d (the resumed run logs those steps again)",
                     path, len(records) - len(keep), step)
