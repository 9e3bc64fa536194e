"""A one-shot sweep of train-step settings, one process per XLA-flag set, and a profile of the best row.

``python -m dit_jax.sweep --out sweep.json`` (on an H200: 8 minutes, ``--plan`` prints the rows and
the estimate) times the real train step (``benchmark.train_benchmark``) of DiT-XL/2 in bfloat16
for each row of ``GPU_PLAN``: issue 22's compute switches (``qkv``, ``gelu_backward``,
``norm_modulate``) alone and together, cuBLASLt GEMM epilogues, per-device batch 32 / 128 / 256
and scanned blocks. A row is a name, a batch, ``set`` (config fields, top-level or dotted:
``{"qkv": "split", "model.scan_blocks": true}``) and ``xla_flags``. XLA reads its flags when the
backend starts, so rows are grouped by their flags and each group runs in ONE child process that
measures its rows one after another (sharing imports, the backend's start and the persistent
compilation cache); each row's result comes back as it finishes. A row that runs out of device
memory or fails is reported as a row (``oom`` / ``failed``) and the group goes on; a child that
dies or stalls past ``--row_timeout_s`` costs its current row (``failed`` / ``oom`` /
``timeout``) and the group's remaining rows go on in a fresh child. Rows that would not finish
within the group's time (``--budget_s`` less the estimated cost of the later groups and the
profile: ``COST``) are reported ``skipped``. Then the fastest row is run again with
``jax.profiler`` (``profile`` in the JSON) and its device time is split into matmuls,
attention, elementwise/normalisation, optimiser/EMA, other and gaps (``time_split``).

Each row prints step time, images/s, MFU (train FLOPs of the model without recomputation,
counted once per batch size on the CPU in a parallel process, over the devices' dense peak
for the dtype: ``flops.py``), peak device memory ("n/a" where the backend keeps no
statistics, e.g. CPUs), compile time and the time from the row's start (its process's launch
for a group's first row) to its first finished step. The table is printed as rows finish and
written to ``--out`` (JSON) after every row, so a killed sweep keeps what it measured.
``--rows FILE`` replaces the plan (a JSON list of rows), ``--set a.b=value`` overrides config
fields of every row (the tests run a tiny model on the CPU this way).

``python -m dit_jax.sweep --time_split DIR`` prints the split of a saved profile (the benchmark's
``--profile_dir``) and exits. GPU traces are read by kernel: inside CUDA command buffers a kernel
event's ``hlo_op`` is the buffer, so its name (``input_add_reduce_fusion_233``) is matched to the
HLO instruction (``input_add_reduce_fusion.233``); cuBLAS/cuDNN kernels count by their names.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from dit_jax import console
from dit_jax import storage

# One row of the sweep: a name, the batch, ``set`` (config field -> value, top-level or dotted)
# and ``xla_flags``. Missing keys take ROW_DEFAULTS.
ROW_DEFAULTS: dict[str, Any] = {"batch": 128, "set": {}, "xla_flags": []}
CUBLASLT = "--xla_gpu_enable_cublaslt=true"  # GEMM epilogues (bias, GELU) by cuBLASLt
# Issue 22's non-GEMM passes, each off by default (recipes.py).
SWITCHES: dict[str, str] = {"qkv": "split", "gelu_backward": "recompute", "norm_modulate": "fused"}
# In order of what is learned first (rows past the time budget are skipped, not lost silently).
GPU_PLAN: tuple[dict[str, Any], ...] = (
    {"name": "b256 baseline", "batch": 256},
    *({"name": f"b256 {k}={v}", "batch": 256, "set": {k: v}} for k, v in SWITCHES.items()),
    {"name": "b256 all switches", "batch": 256, "set": SWITCHES},
    {"name": "b256 all + cublaslt", "batch": 256, "set": SWITCHES, "xla_flags": [CUBLASLT]},
    {"name": "b32 baseline", "batch": 32},
    {"name": "b32 all switches", "batch": 32, "set": SWITCHES},
    {"name": "b128 all switches", "batch": 128, "set": SWITCHES},
    {"name": "b256 all + scan_blocks", "batch": 256, "set": {**SWITCHES, "model.scan_blocks": True}},
)
# The cost model of ``estimate`` (DiT-XL/2 bf16 on one H200; measured 2026-12-04 on main a6b6439 where
# not marked "assumed"): a child process's start (imports, backend; assumed), a row's train-state
# creation (52 s measured before issue 22's jit init, a few s after: assumed), tracing + compiling
# one program (5.6 + 32.2 s; a warm persistent cache makes only an identical program ~free), the
# profile row (its process, 3 traced steps, the trace's conversion and split: ~1 min), and a step:
# 0.40 s at batch 256, 0.21 s at 128 (cuDNN attention), linear in the batch plus a fixed launch cost.
COST: dict[str, float] = {"process_s": 15.0, "init_s": 5.0, "compile_s": 38.0, "profile_s": 60.0,
                          "step_s_per_image": 0.00155, "step_s_fixed": 0.01}
# The categories of ``time_split``, in the order they are tested and printed.
CATEGORIES = ("attention", "matmul", "optimizer_ema", "elementwise_norm", "other")
_RESULT_MARK = "SWEEP_RESULT "
# Device memory a group may take: it is alone on the device (JAX's default is 75%).
MEM_FRACTION = "0.95"
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|\bOOM\b")


def resolve_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with defaults filled in, checked: unknown keys, a missing name, bad flags are errors
    (``row_config`` checks the ``set`` fields against the config)."""
    out = []
    for row in rows:
        unknown = set(row) - set(ROW_DEFAULTS) - {"name"}
        if unknown or "name" not in row:
            raise ValueError(f"sweep row {row!r}: needs a name; unknown keys {sorted(unknown)} (known: name, "
                             f"{', '.join(ROW_DEFAULTS)})")
        row = {**ROW_DEFAULTS, **row}
        problems = []
        if not isinstance(row["xla_flags"], list) or not all(isinstance(f, str) and f.startswith("--")
                                                              for f in row["xla_flags"]):
            problems.append("xla_flags must be a list of --flag=value strings")
        if not isinstance(row["set"], dict) or not all(isinstance(k, str) and k for k in row["set"]):
            problems.append('set must map config fields to values, e.g. {"qkv": "split"}')
        if not isinstance(row["batch"], int) or isinstance(row["batch"], bool) or row["batch"] < 1:
            problems.append("batch must be a positive integer")
        if problems:
            raise ValueError(f"sweep row {row['name']!r}: " + "; ".join(problems))
        out.append({**row, "set": dict(row["set"]), "xla_flags": list(row["xla_flags"])})
    return out


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``a.b=value`` strings -> {"a.b": value}, values read as JSON where they parse (numbers, true), else strings."""
    parsed = {}
    for entry in overrides:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ValueError(f"config overrides are key=value (e.g. model.depth=2), got {entry!r}")
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
        parsed[key] = value
    return parsed


def _override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Set the top-level or dotted field ``key``, read as the field's type; unknown fields are errors."""
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ValueError(f"unknown config field {key!r}")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"unknown config field {key!r}")
    old = node[leaf]
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ValueError(f"config field {key!r} is true or false, got {value!r}")
    node[leaf] = type(old)(value) if old is not None else value


def row_config(base: dict[str, Any], row: dict[str, Any]) -> ml_collections.ConfigDict:
    """The benchmark config of one row: ``base`` (model, image_size, dtype, ``overrides``), then the row's
    batch and ``set``."""
    from dit_jax import benchmark  # imported where a row runs: the parent never starts a JAX backend

    config = benchmark.make_config(base["model"], image_size=base["image_size"], batch=row["batch"],
                                   dtype=base["dtype"], mesh=[])
    for key, value in [*base.get("overrides", {}).items(), *row.get("set", {}).items()]:
        _override(config, key, value)
    return config


def _measure_here(spec: dict[str, Any], row: dict[str, Any], started: float) -> dict[str, Any]:
    """One row's measurement in this process: ``benchmark.train_benchmark`` without the FLOP count,
    the devices' peak for MFU, and, asked for, a profile split by ``time_split``."""
    import jax

    from dit_jax import benchmark, flops
    from dit_jax.models import DTYPES

    config = row_config(spec["base"], row)
    result = benchmark.train_benchmark(config, steps=spec["steps"], warmup=spec["warmup"], count_flops=False,
                                       profile_dir=spec.get("profile_dir"), profile_steps=spec.get("profile_steps", 3))
    peak = flops.peak_flops_per_device(jax.devices()[0], DTYPES[config.dtype])
    result["peak_flops_per_sec"] = None if peak is None else peak * jax.device_count()
    first_step = time.time() - (time.perf_counter() - benchmark._MODULE_START - result["startup"]["since_start_seconds"])
    result["since_launch_seconds"] = first_step - started
    if "profile" in result:
        result["profile"]["split"] = time_split(result["profile"]["dir"], sum(result["profile"]["step_seconds"]),
                                                tokens=_tokens(config))
    return result


def _run_group_here(spec: dict[str, Any]) -> None:
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


def _tokens(config: ml_collections.ConfigDict) -> int:
    """Tokens per image of the config's model (its attention's sequence length)."""
    from dit_jax.models import architecture

    arch = architecture(config.model)
    return (arch["input_size"] // arch["patch_size"]) ** 2


def _count_flops_here(spec: dict[str, Any]) -> dict[str, float]:
    """Train FLOPs per image of the plain model (no remat, XLA attention, unrolled) for each batch (the ``--count`` child)."""
    from flax import nnx

    from dit_jax import sharding, train

    counts = {}
    for batch in spec["batches"]:
        config = row_config(spec["base"], {**ROW_DEFAULTS, "batch": batch})
        abstract_model = nnx.eval_shape(lambda: train.build_model(config, rngs=nnx.Rngs(0)))
        graphdef, _, fixed = nnx.split(abstract_model, nnx.Param, ...)
        state = train.abstract_train_state(config, sharding.create_mesh(config.mesh))
        counts[str(batch)] = train.step_flops(config, graphdef, fixed, train.build_diffusion(config), state) / batch
    return counts


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


def row_seconds(row: dict[str, Any], *, steps: int, warmup: int) -> float:
    """A row's estimated cost (``COST``): state creation, trace + compile, and its steps."""
    step = COST["step_s_fixed"] + COST["step_s_per_image"] * row["batch"]
    return COST["init_s"] + COST["compile_s"] + (warmup + steps) * step


def group_rows(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by their XLA flags (one process each), groups in the order of their first row."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row["xla_flags"]), []).append(row)
    return list(groups.values())


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


# ------------------------------------------------------------------ the profile's time split

_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
# Ops that only hold other ops: their events span their body's events and are not counted.
_CONTAINERS = re.compile(r"(?<![\w-])(while|call|conditional)\(")
# Library kernels a GPU trace names by kernel only (inside CUDA command buffers ``hlo_op`` is the
# buffer): cuBLAS (nvjet, sm90 gemm), CUTLASS and cuDNN's implicit GEMMs, Triton GEMM fusions;
# cuDNN's other kernels (fused attention forward/backward and its dO.O and dQ passes).
_GEMM_KERNEL = re.compile(r"nvjet|gemm|cutlass|cublas|xmma", re.IGNORECASE)
_CUDNN_KERNEL = re.compile(r"cudnn|fmha|sdpa|flash", re.IGNORECASE)
# The files of a saved profile: the trace (any folder below) and the compiled module's text.
TRACE_FILES = ("perfetto_trace.json.gz", "perfetto_trace.json")


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


def _called(line: str, computations: dict[str, list[str]], depth: int = 0) -> list[str]:
    """The lines of ``line`` and of every computation it calls (fusions, custom-call bodies), recursively."""
    lines = [line]
    if depth < 4:
        for name in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
            for inner in computations.get(name, []):
                lines.extend(_called(inner, computations, depth + 1))
    return lines


def classify(line: str, computations: dict[str, list[str]], *, tokens: int, optimizer_scope: str) -> str:
    """The category of one executed HLO instruction (one of ``CATEGORIES``).

    attention: cuDNN's fused attention, batched dots (in a DiT only attention's q.k and p.v
    have batch dimensions), or anything touching an array of rank >= 3 ending in
    ``tokens, tokens`` (softmax; rank 2 is a batch x tokens LayerNorm statistic when batch == tokens);
    matmul: other dots, convolutions (cuDNN's too), cuBLAS/Triton GEMMs; optimizer_ema: ops of
    the step's optimiser scope; elementwise_norm: other fusions and elementwise work (norms,
    modulation, GELU, residuals, copies); other: collectives, control flow, the rest.
    """
    body = "\n".join(_called(line, computations))
    square = re.compile(rf"\[\d+,[\d,]*\b{tokens},{tokens}\]")
    if "fmha" in body or "lhs_batch_dims" in body or square.search(body):
        return "attention"
    if re.search(r"\b(dot|convolution)\(|cublas|gemm|cudnn\$conv", body):
        return "matmul"
    if optimizer_scope in body:
        return "optimizer_ema"
    if re.search(r"(?<![\w-])(fusion|copy|transpose|add|multiply|subtract|divide|exponential|tanh|reduce|broadcast|select|"
                 r"convert|maximum|rsqrt|sqrt|negate|power|concatenate|slice|dynamic-slice|dynamic-update-slice|"
                 r"pad|iota|compare|log|bitcast|reshape)\(", body.split("\n", 1)[0]):
        return "elementwise_norm"
    return "other"


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


def _profiled_steps(events: list[dict[str, Any]], module: str) -> int | None:
    """How many times the trace ran ``module``: its distinct ``run_id``s (CPUs), else its host
    ``Execute (module)`` events (GPUs); None when the trace says neither."""
    runs = {e["args"]["run_id"] for e in events if e.get("ph") == "X" and "run_id" in e.get("args", {})
            and e["args"].get("hlo_module") == module}
    executes = [e for e in events if e.get("ph") == "X" and e.get("name", "").endswith(f"Execute ({module})")]
    return len(runs) or len(executes) or None


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals, in the trace's microseconds -> seconds."""
    total, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e6


def time_split(profile_dir: str, wall_seconds: float | None = None, *, tokens: int) -> dict[str, Any]:
    """Where the profiled steps' time went: seconds per category, busy time and gaps, the top ops.

    ``profile_dir`` holds a Perfetto trace and the compiled module's text (``benchmark.PROFILE_HLO``,
    gzipped or not). ``wall_seconds`` is the host-timed total of the profiled steps; None takes the
    span of the module's events in the trace. Each event is attributed to an HLO instruction: its
    ``hlo_op`` where that is one (CPUs, thunks outside command buffers), else its kernel name
    (``kernel_name``), and classified by the compiled text (``classify``); library kernels of no
    instruction by name (GEMMs: matmul, cuDNN: attention, the rest: other). The categories sum
    event durations (on a CPU ops overlap across threads, so the split is coarse and may exceed
    the wall time); ``busy_seconds`` is the union of the events' intervals, ``gaps`` the rest of
    the wall time. ``steps`` is how many steps the trace ran (None if it does not say).
    """
    from dit_jax import benchmark, train

    text = _read_text(_newest(profile_dir, (benchmark.PROFILE_HLO, benchmark.PROFILE_HLO + ".gz")))
    module = text.split(None, 2)[1].rstrip(",") if text.startswith("HloModule") else ""
    instructions, computations = parse_hlo(text)
    by_kernel = {kernel_name(name): name for name in instructions}
    events = load_trace(profile_dir)
    steps = _profiled_steps(events, module)
    seconds: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, float] = defaultdict(float)
    categories: dict[str, str] = {}
    counted = []
    for event in _trace_events(events, module):
        hlo_op, name = event["args"]["hlo_op"], event.get("name", "")
        op = hlo_op if hlo_op in instructions else by_kernel.get(name)
        if op is not None and _CONTAINERS.search(instructions[op].split("metadata=", 1)[0]):
            continue
        key = op or name
        if key not in categories:
            categories[key] = (classify(instructions[op], computations, tokens=tokens,
                                        optimizer_scope=train.OPTIMIZER_SCOPE) if op is not None
                               else "matmul" if _GEMM_KERNEL.search(name)
                               else "attention" if _CUDNN_KERNEL.search(name) else "other")
        seconds[categories[key]] += event["dur"] / 1e6
        per_op[key] += event["dur"] / 1e6
        counted.append(event)
    busy = _union_seconds([(e["ts"], e["ts"] + e["dur"]) for e in counted])
    if wall_seconds is None:
        wall_seconds = (max(e["ts"] + e["dur"] for e in counted) - min(e["ts"] for e in counted)) / 1e6 if counted else 0.0
    top = sorted(per_op, key=per_op.get, reverse=True)[:10]
    return {"seconds": seconds, "busy_seconds": busy, "gaps_seconds": max(wall_seconds - busy, 0.0),
            "wall_seconds": wall_seconds, "events": len(counted), "steps": steps,
            "top_ops": [{"op": op, "category": categories[op], "seconds": per_op[op]} for op in top]}


# ------------------------------------------------------------------ the sweep and its table

def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _settings(row: dict[str, Any]) -> str:
    """A row's name, batch, ``set`` and XLA flags as the first table cells."""
    fields = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in row["set"].items()) or "-"
    flags = " ".join(f.removeprefix("--xla_gpu_") for f in row["xla_flags"]) or "-"
    return f"| {row['name']} | {row['batch']} | {fields} | {flags} "


def format_row(row: dict[str, Any]) -> str:
    """One table line (``TABLE_HEADER``'s columns)."""
    settings = _settings(row["row"])
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


def estimate(rows: list[dict[str, Any]], *, steps: int, warmup: int, budget_s: float,
             profile_steps: int) -> dict[str, Any]:
    """The plan's cost by ``COST``, in the order the sweep runs it (``group_rows``) and by its rule (a row
    runs when it fits its group's time, ``group_deadlines``): each row's estimated seconds, its
    finish time (None when skipped), and the total of the rows that run and the profile."""
    reserve = COST["profile_s"] if profile_steps else 0.0
    groups = group_rows(rows)
    planned, clock = [], 0.0
    for process, (group, deadline) in enumerate(zip(groups, group_deadlines(groups, budget_s - reserve, steps=steps,
                                                                            warmup=warmup))):
        clock += COST["process_s"]
        for row in group:
            seconds = row_seconds(row, steps=steps, warmup=warmup)
            fits = clock + seconds <= deadline
            clock += seconds if fits else 0.0
            planned.append({"row": row, "process": process, "seconds": seconds, "finish_s": clock if fits else None})
    return {"rows": planned, "profile_s": reserve, "total_s": clock + reserve, "budget_s": budget_s}


def group_deadlines(groups: list[list[dict[str, Any]]], seconds: float, *, steps: int, warmup: int) -> list[float]:
    """Each group's deadline, in seconds from the sweep's start: ``seconds`` less the estimated cost of
    the groups after it (so a later group's first rows are not crowded out by an earlier group's last)."""
    costs = [COST["process_s"] + sum(row_seconds(r, steps=steps, warmup=warmup) for r in g) for g in groups]
    return [seconds - sum(costs[i + 1:]) for i in range(len(groups))]


def format_plan(plan: dict[str, Any]) -> str:
    """``estimate``'s table: the rows in run order with their process, estimated cost and finish time."""
    lines = ["| row | batch | set | XLA flags | process | est. s | done at s | fits |", "|---|---:|---|---|---:|---:|---:|---|"]
    lines += [_settings(p["row"]) + f"| {p['process']} | {p['seconds']:.0f} | "
              + ("| skipped |" if p["finish_s"] is None else f"{p['finish_s']:.0f} | yes |") for p in plan["rows"]]
    fits = sum(p["finish_s"] is not None for p in plan["rows"])
    lines.append(f"estimate: {plan['total_s']:.0f} s for {fits} of {len(plan['rows'])} rows and the profile "
                 f"({plan['profile_s']:.0f} s) within the budget of {plan['budget_s']:.0f} s. "
                 f"Cost model (COST): process {COST['process_s']:.0f} s, per row init {COST['init_s']:.0f} s + trace "
                 f"and compile {COST['compile_s']:.0f} s + (warm-up + timed) steps x ({COST['step_s_fixed']} s + "
                 f"{COST['step_s_per_image']} s x batch)")
    return "\n".join(lines)


def format_split(split: dict[str, Any], steps: int) -> str:
    """The profile's split as lines: ms per step and share of the wall time for each category and the gaps."""
    wall = split["wall_seconds"]
    parts = [f"{name} {1e3 * value / steps:.1f} ms ({100 * value / wall:.0f}%)"
             for name, value in [*split["seconds"].items(), ("gaps", split["gaps_seconds"])]]
    top = ", ".join(f"{o['op']} ({o['category']}) {1e3 * o['seconds'] / steps:.2f} ms" for o in split["top_ops"][:5])
    return (f"per step ({1e3 * wall / steps:.1f} ms wall, {split['events']} op events): " + ", ".join(parts)
            + f"\ntop ops per step: {top}")


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
                                           f"compilation cache): " + format_split(p["split"], profile_steps)
                                           if p["status"] == "ok" else f": {p['status']}: {p['error']}"))
    return result


def _define_flags() -> None:
    from absl import flags

    from dit_jax import compilation_cache

    flags.DEFINE_string("model", "DiT-XL/2", "Paper model name (models.MODELS).")
    flags.DEFINE_integer("image_size", 256, "Image size; the model sees image_size / 8 latents.")
    flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype of every row.")
    flags.DEFINE_string("rows", None, "A JSON file with a list of rows instead of GPU_PLAN.")
    flags.DEFINE_multi_string("set", [], "Config overrides a.b=value for every row (e.g. model.depth=2).")
    flags.DEFINE_integer("steps", 6, "Timed steps per row (the median is reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps per row first (the first compiles).")
    flags.DEFINE_float("budget_s", 480, "Wall-clock budget of the whole sweep, profile included.")
    flags.DEFINE_float("row_timeout_s", 150, "Time limit of one row (from its process's launch for a group's first).")
    flags.DEFINE_integer("profile_steps", 3, "Steps of the best row's profile; 0 skips it.")
    flags.DEFINE_float("profile_reserve_s", COST["profile_s"], "Budget kept for the profile when starting rows.")
    flags.DEFINE_string("profile_dir", "sweep_profile", "Where the profile (TensorBoard/Perfetto) goes.")
    flags.DEFINE_string("out", "sweep.json", "The table as JSON (rewritten after every row).")
    compilation_cache.define_flag()
    flags.DEFINE_bool("plan", False, "Print the rows, their processes and the time estimate (COST), run nothing.")
    flags.DEFINE_string("time_split", None, "Print the time split of a saved profile in this folder (a Perfetto "
                        "trace and the benchmark's train_step.hlo.txt, gzipped or not; --model and --image_size give "
                        "its tokens) and exit.")
    flags.DEFINE_string("group", None, "Internal: measure the rows given as JSON, printing each result.")
    flags.DEFINE_string("count", None, "Internal: count train FLOPs per image for the batches given as JSON.")


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.group:
        from dit_jax import compilation_cache

        spec = json.loads(f.group)
        compilation_cache.enable(spec["compilation_cache"])
        _run_group_here(spec)
        return
    if f.count:
        print(_RESULT_MARK + json.dumps(_count_flops_here(json.loads(f.count))), flush=True)
        return
    if f.time_split:
        config = row_config({"model": f.model, "image_size": f.image_size, "dtype": f.dtype}, ROW_DEFAULTS)
        split = time_split(f.time_split, tokens=_tokens(config))
        print(format_split(split, split["steps"] or f.profile_steps))
        return
    try:
        base = {"model": f.model, "image_size": f.image_size, "dtype": f.dtype, "overrides": parse_overrides(f.set)}
        if f.rows:
            with open(f.rows) as fh:
                rows = resolve_rows(json.load(fh))
        else:
            rows = resolve_rows(GPU_PLAN)
        for row in rows:  # a bad model, field or value fails here, before any row runs
            row_config(base, row)
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as e:
        raise app.UsageError(str(e)) from e
    if f.plan:
        print(format_plan(estimate(rows, steps=f.steps, warmup=f.warmup, budget_s=f.budget_s,
                                   profile_steps=f.profile_steps)))
        return
    sweep(base, rows, steps=f.steps, warmup=f.warmup, budget_s=f.budget_s, row_timeout_s=f.row_timeout_s,
          profile_steps=f.profile_steps, profile_reserve_s=f.profile_reserve_s, out=f.out,
          profile_dir=os.path.abspath(f.profile_dir), compilation_cache=f.compilation_cache)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
