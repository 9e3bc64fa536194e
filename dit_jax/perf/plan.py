"""The sweep's plan: its rows (``GPU_PLAN``, or a JSON list), each row's config, and the time estimate
(``COST``) that ``--plan`` prints and the sweep's time budget follows.

A row is a name, a batch, ``set`` (config fields, top-level or dotted:
``{"qkv": "split", "model.scan_blocks": true}``) and ``xla_flags``. XLA reads its flags when the
backend starts, so rows are grouped by their flags (``group_rows``) and each group runs in one
process (``runner``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from dit_jax.perf.measure import make_config

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
    config = make_config(base["model"], image_size=base["image_size"], batch=row["batch"], dtype=base["dtype"],
                         mesh=[])
    for key, value in [*base.get("overrides", {}).items(), *row.get("set", {}).items()]:
        _override(config, key, value)
    return config


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


def group_deadlines(groups: list[list[dict[str, Any]]], seconds: float, *, steps: int, warmup: int) -> list[float]:
    """Each group's deadline, in seconds from the sweep's start: ``seconds`` less the estimated cost of
    the groups after it (so a later group's first rows are not crowded out by an earlier group's last)."""
    costs = [COST["process_s"] + sum(row_seconds(r, steps=steps, warmup=warmup) for r in g) for g in groups]
    return [seconds - sum(costs[i + 1:]) for i in range(len(groups))]


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


def settings_cells(row: dict[str, Any]) -> str:
    """A row's name, batch, ``set`` and XLA flags as the first table cells."""
    fields = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in row["set"].items()) or "-"
    flags = " ".join(f.removeprefix("--xla_gpu_") for f in row["xla_flags"]) or "-"
    return f"| {row['name']} | {row['batch']} | {fields} | {flags} "


def format_plan(plan: dict[str, Any]) -> str:
    """``estimate``'s table: the rows in run order with their process, estimated cost and finish time."""
    lines = ["| row | batch | set | XLA flags | process | est. s | done at s | fits |", "|---|---:|---|---|---:|---:|---:|---|"]
    lines += [settings_cells(p["row"]) + f"| {p['process']} | {p['seconds']:.0f} | "
              + ("| skipped |" if p["finish_s"] is None else f"{p['finish_s']:.0f} | yes |") for p in plan["rows"]]
    fits = sum(p["finish_s"] is not None for p in plan["rows"])
    lines.append(f"estimate: {plan['total_s']:.0f} s for {fits} of {len(plan['rows'])} rows and the profile "
                 f"({plan['profile_s']:.0f} s) within the budget of {plan['budget_s']:.0f} s. "
                 f"Cost model (COST): process {COST['process_s']:.0f} s, per row init {COST['init_s']:.0f} s + trace "
                 f"and compile {COST['compile_s']:.0f} s + (warm-up + timed) steps x ({COST['step_s_fixed']} s + "
                 f"{COST['step_s_per_image']} s x batch)")
    return "\n".join(lines)

