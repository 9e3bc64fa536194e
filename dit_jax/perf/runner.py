"""The sweep's runs: each XLA-flag group of rows in one child process, the FLOP count beside them on the
CPU, then a profile of the fastest row; the table as rows finish.

A group's child (``python -m dit_jax.sweep --group SPEC``, ``group_child``) measures its rows one
after another (sharing imports, the backend's start and the persistent compilation cache) and prints
each result as it finishes. A row that runs out of device memory or fails is reported as a row
(``oom`` / ``failed``) and the group goes on; a child that dies or stalls past ``row_timeout_s``
costs its current row (``failed`` / ``oom`` / ``timeout``) and the group's remaining rows go on in a
fresh child. Rows that would not finish within the group's time (the budget less the estimated cost
of the later groups and the profile: ``plan.COST``) are reported ``skipped``. The train FLOPs of the
model without recomputation are counted once per batch size in a parallel CPU process
(``--count``, ``count_child``) for the MFU.
"""

from __future__ import annotations

import gc
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from dit_jax import flops, sharding, storage, train, train_state
from dit_jax.model_compute import DTYPES
from dit_jax.perf import measure, time_split
from dit_jax.perf.plan import (ROW_DEFAULTS, group_deadlines, group_rows, resolve_rows, row_config, row_seconds,
                               settings_cells)

_RESULT_MARK = "SWEEP_RESULT "
# Device memory a group may take: it is alone on the device (JAX's default is 75%).
MEM_FRACTION = "0.95"
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|\bOOM\b")


def _measure_here(spec: dict[str, Any], row: dict[str, Any], started: float) -> dict[str, Any]:
    """One row's measurement in this process: ``measure.train_benchmark`` without the FLOP count,
    the devices' peak for MFU, and, asked for, a profile split by ``time_split``."""
    config = row_config(spec["base"], row)
    result = measure.train_benchmark(config, steps=spec["steps"], warmup=spec["warmup"], count_flops=False,
                                     profile_dir=spec.get("profile_dir"), profile_steps=spec.get("profile_steps", 3))
    peak = flops.peak_flops_per_device(jax.devices()[0], DTYPES[config.dtype])
    result["peak_flops_per_sec"] = None if peak is None else peak * jax.device_count()
    first_step = time.time() - (time.perf_counter() - measure.IMPORTED - result["startup"]["since_start_seconds"])
    result["since_launch_seconds"] = first_step - started
    if "profile" in result:
        result["profile"]["split"] = time_split.of_profile(result["profile"]["dir"],
                                                           sum(result["profile"]["step_seconds"]),
                                                           tokens=time_split.tokens_per_image(config))
    return result


def group_child(spec: dict[str, Any]) -> None:
    """The ``--group`` child: measure ``spec["rows"]`` one after another, printing each result as it
    finishes. A row that fails (out of memory included) is its result and the next row runs; a row
    whose estimated cost does not fit before ``spec["deadline"]`` is ``skipped``."""
    for i, (row, cost) in enumerate(zip(spec["rows"], spec["costs"])):
        started = spec["launched_at"] if i == 0 else time.time()
        if time.time() + cost > spec["deadline"]:
            result = {"row": row, "status": "skipped", "error": "time budget spent"}
        else:
            try:
                result = {"row": row, "status": "ok", **_measure_here(spec, row, started)}
            except Exception as e:  # noqa: BLE001 - any failure of one row is that row's result
                lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
                oom = [line for line in lines if _OOM.search(line)]
                result = {"row": row, "status": "oom" if oom else "failed", "error": (oom or lines)[0][:400]}
            gc.collect()  # the failed row's state and batch, held by its traceback until now
        print(_RESULT_MARK + json.dumps({**result, "pid": os.getpid()}), flush=True)


def count_child(spec: dict[str, Any]) -> None:
    """The ``--count`` child: prints the train FLOPs per image of the plain model (no remat, XLA attention,
    unrolled) for each of ``spec["batches"]``."""
    counts = {}
    for batch in spec["batches"]:
        config = row_config(spec["base"], {**ROW_DEFAULTS, "batch": batch})
        abstract_model = nnx.eval_shape(lambda: train_state.build_model(config, rngs=nnx.Rngs(0)))
        graphdef, _, fixed = nnx.split(abstract_model, nnx.Param, ...)
        state = train_state.abstract_train_state(config, sharding.create_mesh(config.mesh))
        counts[str(batch)] = train.step_flops(config, graphdef, fixed, train.build_diffusion(config), state) / batch
    print(_RESULT_MARK + json.dumps(counts), flush=True)


def _child_command(mode: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "dit_jax.sweep", f"--{mode}", json.dumps(spec)]


def _child_result(stdout: str) -> dict[str, Any] | None:
    lines = [line for line in stdout.splitlines() if line.startswith(_RESULT_MARK)]
    return json.loads(lines[-1][len(_RESULT_MARK):]) if lines else None


def _failure(stderr: str) -> tuple[str, str]:
    """(status, the most telling line) of a failed child: ``oom`` when it ran out of device memory."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    oom = [line for line in lines if _OOM.search(line)]
    errors = [line for line in lines if re.search(r"Error|error|Unknown flag|F\d{4} ", line)]
    return ("oom", oom[-1]) if oom else ("failed", (errors or lines or ["no output"])[-1])


def _run_child(base: dict[str, Any], rows: list[dict[str, Any]], *, steps: int, warmup: int, deadline: float,
               row_timeout_s: float, on_result: Callable[[dict[str, Any]], None], compilation_cache: str | None = None,
               profile_dir: str | None = None, profile_steps: int = 3) -> dict[str, Any] | None:
    """``rows`` (one XLA-flag set) measured in one fresh child process with the rows' ``XLA_FLAGS`` (appended
    to the caller's), each result passed to ``on_result`` as it comes. Returns None when every row
    reported, else the outcome of the row it stopped at (``failed`` / ``oom`` when the child died,
    ``timeout`` when no result came within ``row_timeout_s`` or before ``deadline`` (monotonic)). The child
    uses the persistent compilation cache ``compilation_cache`` (``compilation_cache.enable``)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *rows[0]["xla_flags"]]).strip()
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
    spec = {"base": base, "rows": rows, "costs": [row_seconds(r, steps=steps, warmup=warmup) for r in rows],
            "steps": steps, "warmup": warmup, "launched_at": time.time(),
            "deadline": time.time() + deadline - time.monotonic(), "compilation_cache": compilation_cache,
            "profile_dir": profile_dir,
            "profile_steps": profile_steps}
    lines: queue.Queue[str | None] = queue.Queue()
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(_child_command("group", spec), stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reported, last = 0, time.monotonic()
        while True:
            wait = min(deadline, last + row_timeout_s) - time.monotonic()
            try:
                line = lines.get(timeout=max(wait, 0.0))
            except queue.Empty:
                proc.kill()
                proc.wait()
                limit = min(row_timeout_s, deadline - last)
                return {"row": rows[reported], "status": "timeout", "error": f"no result within {limit:.0f} s"}
            if line is None:
                break
            if line.startswith(_RESULT_MARK):
                on_result(json.loads(line[len(_RESULT_MARK):]))
                reported, last = reported + 1, time.monotonic()
        proc.wait()
        reader.join()
        proc.stdout.close()
        if reported == len(rows):
            return None
        stderr.seek(0)
        status, error = _failure(stderr.read())
        return {"row": rows[reported], "status": status, "error": error, "returncode": proc.returncode}


def run_group(base: dict[str, Any], rows: list[dict[str, Any]], *, steps: int, warmup: int, deadline: float,
              row_timeout_s: float, on_result: Callable[[dict[str, Any]], None], **child: Any) -> None:
    """Rows of one XLA-flag set measured in one child process; when the child dies or stalls, its row is
    reported and the rows after it go on in a fresh child while ``deadline`` (monotonic) allows."""
    pending = list(rows)
    while pending:
        if time.monotonic() >= deadline:
            for row in pending:
                on_result({"row": row, "status": "skipped", "error": "time budget spent"})
            return
        done = []
        stopped = _run_child(base, pending, steps=steps, warmup=warmup, deadline=deadline,
                             row_timeout_s=row_timeout_s, on_result=lambda r: (done.append(r), on_result(r)),
                             **child)
        pending = pending[len(done):]
        if stopped is not None:
            on_result(stopped)
            pending = pending[1:]


def _start_count(base: dict[str, Any], batches: list[int]) -> subprocess.Popen:
    """The FLOP count, started beside the rows on the host CPU (never the accelerator)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(_child_command("count", {"base": base, "batches": batches}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish_count(proc: subprocess.Popen, timeout_s: float) -> tuple[dict[str, float], str | None]:
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {}, "the FLOP count did not finish in time: MFU unknown"
    result = _child_result(stdout)
    return (result, None) if proc.returncode == 0 and result else ({}, "FLOP count failed: " + _failure(stderr)[1])


def add_mfu(rows: list[dict[str, Any]], flops_per_image: dict[str, float]) -> None:
    """MFU of each measured row: model FLOPs per image x images/s over the devices' peak (None where unknown)."""
    for row in rows:
        if row["status"] != "ok":
            continue
        count, peak = flops_per_image.get(str(row["batch"])), row["peak_flops_per_sec"]
        row["train_flops_per_image"] = count
        row["mfu"] = None if count is None or peak is None else count * row["images_per_sec"] / peak


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_row(row: dict[str, Any]) -> str:
    """One table line (``TABLE_HEADER``'s columns)."""
    settings = settings_cells(row["row"])
    if row["status"] != "ok":
        return settings + f"| {row['status']}: {row.get('error', '')[:120]} | | | | | | |"
    mem = row["peak_memory_bytes"]
    return settings + (f"| ok | {1e3 * row['step_seconds_median']:.1f} | {row['images_per_sec']:.1f} | "
                       f"{_cell(None if row.get('mfu') is None else 100 * row['mfu'], '.1f')}"
                       f"{'%' if row.get('mfu') is not None else ''} | {_cell(None if mem is None else mem / 2**30, '.1f')} | "
                       f"{row['startup']['compile_seconds']:.1f}{' warm' if row['compilation_cache']['warm'] else ''} | "
                       f"{row['since_launch_seconds']:.1f} |")


TABLE_HEADER = ("| row | batch | set | XLA flags | status | step ms | img/s | MFU | peak GiB | compile s | "
                "start to 1st step s |\n|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|")


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok"]
    return max(ok, key=lambda r: r["images_per_sec"]) if ok else None


def sweep(base: dict[str, Any], rows: list[dict[str, Any]], *, steps: int, warmup: int, budget_s: float,
          row_timeout_s: float, profile_steps: int, profile_reserve_s: float, out: str | None,
          profile_dir: str, compilation_cache: str | None = None, log=print) -> dict[str, Any]:
    """Run ``rows`` (``resolve_rows``), one process per XLA-flag set, then profile the fastest; print the
    table as it grows, write ``out``. Each group's time is what the budget leaves after the profile's
    reserve and the estimated cost of the groups after it (``group_deadlines``). Every child uses the
    persistent compilation cache ``compilation_cache`` (None: its default folder; "off"), so the profile
    of a row reads the row's compiled step from it."""
    rows = resolve_rows(rows)
    start = time.monotonic()
    deadline = start + budget_s - (profile_reserve_s if profile_steps else 0.0)
    counting = _start_count(base, sorted({r["batch"] for r in rows}))
    result: dict[str, Any] = {"base": base, "steps": steps, "warmup": warmup, "budget_s": budget_s, "rows": []}

    def save() -> None:
        if out:
            storage.write_atomic(out, json.dumps(result, indent=1))

    def record(measured: dict[str, Any]) -> None:
        result["rows"].append(measured)
        log(format_row(measured))
        save()

    groups = group_rows(rows)
    log(f"sweep of {len(rows)} rows in {len(groups)} processes: {base['model']} {base['image_size']}px "
        f"{base['dtype']}, {steps} timed steps after {warmup} warm-up, budget {budget_s:.0f} s\n{TABLE_HEADER}")
    for group, seconds in zip(groups, group_deadlines(groups, deadline - start, steps=steps, warmup=warmup)):
        run_group(base, group, steps=steps, warmup=warmup, deadline=start + seconds, row_timeout_s=row_timeout_s,
                  on_result=record, compilation_cache=compilation_cache)
    result["rows"].sort(key=lambda r: rows.index(r["row"]))  # the plan's order again
    best = _best(result["rows"])
    if profile_steps and best is not None:
        profiled: list[dict[str, Any]] = []
        run_group(base, [best["row"]], steps=1, warmup=warmup, deadline=max(start + budget_s, time.monotonic() + 30),
                  row_timeout_s=row_timeout_s, on_result=profiled.append, compilation_cache=compilation_cache,
                  profile_dir=profile_dir, profile_steps=profile_steps)
        p = profiled[0]
        result["profile"] = {"row": best["row"]["name"], "status": p["status"],
                             **({"split": p["profile"]["split"], "dir": profile_dir,
                                 "compile_warm": p["compilation_cache"]["warm"]}
                                if p["status"] == "ok" else {"error": p.get("error")})}
    counts, problem = _finish_count(counting, start + budget_s - time.monotonic() + 60)
    add_mfu(result["rows"], counts)
    result["train_flops_per_image"], result["flops_count_problem"] = counts, problem
    save()
    log("\n" + TABLE_HEADER + "\n" + "\n".join(format_row(r) for r in result["rows"]))
    if problem:
        log(problem)
    if "profile" in result:
        p = result["profile"]
        log(f"profile of {p['row']!r}" + (f" (its step {'read from' if p['compile_warm'] else 'not in'} the "
                                           f"compilation cache): " + time_split.format_split(p["split"], profile_steps)
                                           if p["status"] == "ok" else f": {p['status']}: {p['error']}"))
    return result
