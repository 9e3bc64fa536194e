"""A saved profile of the train step: the compiled module's text and the Perfetto trace's op events,
each event matched to the HLO instruction it ran.

A profile folder (``measure.train_benchmark``'s ``profile_dir``) holds a Perfetto trace
(``TRACE_FILES``, in any folder below) and the compiled module's text (``PROFILE_HLO``, gzipped or
not). GPU traces are read by kernel: inside CUDA command buffers a kernel event's ``hlo_op`` is the
buffer, so its name (``input_add_reduce_fusion_233``) is matched to the HLO instruction
(``input_add_reduce_fusion.233``); cuBLAS/cuDNN kernels belong to no instruction and keep their names.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

# The compiled train step's HLO text, written beside a profile (its op names are the trace's).
PROFILE_HLO = "train_step.hlo.txt"
# The trace of a saved profile (any folder below).
TRACE_FILES = ("perfetto_trace.json.gz", "perfetto_trace.json")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# Ops that only hold other ops: their events span their body's events and are not counted.
_CONTAINERS = re.compile(r"(?<![\w-])(while|call|conditional)\(")


class Profile(NamedTuple):
    """A saved profile read back: the module's name, its instructions and computations (``parse_hlo``)
    and every trace event."""
    module: str
    instructions: dict[str, str]
    computations: dict[str, list[str]]
    events: list[dict[str, Any]]


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The compiled module's text -> (instruction name -> its line, computation name -> its instructions' lines).

    Computations start at the line's first column and end their header with ``{``; their
    instructions are indented ``name = shape op(...)`` lines.
    """
    instructions, computations, current = {}, defaultdict(list), None
    for line in text.splitlines():
        if line[:1] not in ("", " ", "\t", "}") and line.rstrip().endswith("{"):
            current = line.removeprefix("ENTRY ").split()[0].lstrip("%")
        elif current is not None and (match := _INSTRUCTION.match(line)):
            instructions[match.group(1)] = match.group(2)
            computations[current].append(match.group(2))
    return instructions, computations


def kernel_name(instruction: str) -> str:
    """The name of the GPU kernel XLA emits for an instruction: every character that is not a letter,
    digit or ``_`` becomes ``_`` (``input_add_reduce_fusion.233`` -> ``input_add_reduce_fusion_233``,
    ``input_reduce_fusion`` unchanged)."""
    return re.sub(r"\W", "_", instruction, flags=re.ASCII)


def _newest(profile_dir: str, names: Sequence[str]) -> str:
    paths = []
    for root, _, files in os.walk(profile_dir):
        paths += [os.path.join(root, f) for f in files if f in names]
    if not paths:
        raise FileNotFoundError(f"none of {', '.join(names)} under {profile_dir}")
    return max(paths, key=os.path.getmtime)


def _read_text(path: str) -> str:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return f.read()


def load_trace(profile_dir: str) -> list[dict[str, Any]]:
    """The events of the newest Perfetto trace (``TRACE_FILES``) under ``profile_dir``."""
    trace = json.loads(_read_text(_newest(profile_dir, TRACE_FILES)))
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def read_profile(profile_dir: str) -> Profile:
    """The newest module text (``PROFILE_HLO``) and trace under ``profile_dir``."""
    text = _read_text(_newest(profile_dir, (PROFILE_HLO, PROFILE_HLO + ".gz")))
    module = text.split(None, 2)[1].rstrip(",") if text.startswith("HloModule") else ""
    return Profile(module, *parse_hlo(text), load_trace(profile_dir))


def _trace_events(events: list[dict[str, Any]], module: str) -> list[dict[str, Any]]:
    """The op events (``args.hlo_op``) of ``module`` on the lines where its work ran, each counted once.

    On GPUs: the device's kernel lines (``Stream #N``), whose events are kernels (inside CUDA
    command buffers named by kernel, ``hlo_op`` the buffer); the derived "XLA Ops" line only
    where a device has no kernel lines (TPUs). On a CPU (no device process): every thread's op
    events (``name == hlo_op``).
    """
    processes = {e.get("pid"): e["args"].get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e.get("pid"), e.get("tid")): e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
           and e["args"].get("hlo_module", module) == module]
    device = [e for e in ops if processes.get(e.get("pid"), "").startswith("/device:")]
    if not device:
        return [e for e in ops if e.get("name") == e["args"]["hlo_op"]]
    line = lambda e: threads.get((e.get("pid"), e.get("tid")), "")  # noqa: E731
    return [e for e in device if line(e).startswith("Stream")] or [e for e in device if "XLA Ops" in line(e)]


def op_events(profile: Profile) -> list[tuple[dict[str, Any], str | None]]:
    """The module's executed op events, each with the instruction it ran: its ``hlo_op`` where that is
    one (CPUs, thunks outside command buffers), else the instruction whose ``kernel_name`` is the
    event's name, else None (a library kernel: cuBLAS, cuDNN). Events of ops that only hold other
    ops (while, call, conditional) are left out: their bodies' events are counted."""
    by_kernel = {kernel_name(name): name for name in profile.instructions}
    matched = []
    for event in _trace_events(profile.events, profile.module):
        hlo_op = event["args"]["hlo_op"]
        op = hlo_op if hlo_op in profile.instructions else by_kernel.get(event.get("name", ""))
        if op is None or not _CONTAINERS.search(profile.instructions[op].split("metadata=", 1)[0]):
            matched.append((event, op))
    return matched


def profiled_steps(profile: Profile) -> int | None:
    """How many times the trace ran the module: its distinct ``run_id``s (CPUs), else its host
    ``Execute (module)`` events (GPUs); None when the trace says neither."""
    events, module = profile.events, profile.module
    runs = {e["args"]["run_id"] for e in events if e.get("ph") == "X" and "run_id" in e.get("args", {})
            and e["args"].get("hlo_module") == module}
    executes = [e for e in events if e.get("ph") == "X" and e.get("name", "").endswith(f"Execute ({module})")]
    return len(runs) or len(executes) or None


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals, in the trace's microseconds -> seconds."""
    total, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6
