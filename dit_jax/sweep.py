"""A one-shot sweep of train-step settings, one process per XLA-flag set, and a profile of the best row.

``python -m dit_jax.sweep --out sweep.json`` (on an H200: 8 minutes, ``--plan`` prints the rows and
the estimate) times the real train step (``perf/measure.py``) of DiT-XL/2 in bfloat16 for each row of
``perf/plan.py``'s ``GPU_PLAN``: issue 22's compute switches (``qkv``, ``gelu_backward``,
``norm_modulate``) alone and together, cuBLASLt GEMM epilogues, per-device batch 32 / 128 / 256 and
scanned blocks. Rows are grouped by their XLA flags, each group in one child process; a row that
runs out of memory, fails, stalls or would not fit the time budget (``--budget_s``, by the cost
model ``plan.COST``) is reported as a row (``perf/runner.py``). Then the fastest row is run again
with ``jax.profiler`` (``profile`` in the JSON) and its device time is split into matmuls,
attention, elementwise/normalisation, optimiser/EMA, other and gaps (``perf/time_split.py``).

Each row prints step time, images/s, MFU (train FLOPs of the model without recomputation,
counted once per batch size on the CPU in a parallel process, over the devices' dense peak
for the dtype: ``flops.py``), peak device memory ("n/a" where the backend keeps no
statistics, e.g. CPUs), compile time and the time from the row's start (its process's launch
for a group's first row) to its first finished step. The table is printed as rows finish and
written to ``--out`` (JSON) after every row, so a killed sweep keeps what it measured.
``--rows FILE`` replaces the plan (a JSON list of rows), ``--set a.b=value`` overrides config
fields of every row (the tests run a tiny model on the CPU this way).

``python -m dit_jax.sweep --time_split DIR`` prints the split of a saved profile (the benchmark's
``--profile_dir``; ``perf/trace.py`` reads it) and exits.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from dit_jax import compilation_cache, console
from dit_jax.perf import plan, runner, time_split


def _define_flags() -> None:
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
    flags.DEFINE_float("profile_reserve_s", plan.COST["profile_s"], "Budget kept for the profile when starting rows.")
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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.group:
        spec = json.loads(f.group)
        compilation_cache.enable(spec["compilation_cache"])
        runner.group_child(spec)
        return
    if f.count:
        runner.count_child(json.loads(f.count))
        return
    if f.time_split:
        config = plan.row_config({"model": f.model, "image_size": f.image_size, "dtype": f.dtype}, plan.ROW_DEFAULTS)
        split = time_split.of_profile(f.time_split, tokens=time_split.tokens_per_image(config))
        print(time_split.format_split(split, split["steps"] or f.profile_steps))
        return
    try:
        base = {"model": f.model, "image_size": f.image_size, "dtype": f.dtype,
                "overrides": plan.parse_overrides(f.set)}
        if f.rows:
            with open(f.rows) as fh:
                rows = plan.resolve_rows(json.load(fh))
        else:
            rows = plan.resolve_rows(plan.GPU_PLAN)
        for row in rows:  # a bad model, field or value fails here, before any row runs
            plan.row_config(base, row)
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as e:
        raise app.UsageError(str(e)) from e
    if f.plan:
        print(plan.format_plan(plan.estimate(rows, steps=f.steps, warmup=f.warmup, budget_s=f.budget_s,
                                             profile_steps=f.profile_steps)))
        return
    runner.sweep(base, rows, steps=f.steps, warmup=f.warmup, budget_s=f.budget_s, row_timeout_s=f.row_timeout_s,
                 profile_steps=f.profile_steps, profile_reserve_s=f.profile_reserve_s, out=f.out,
                 profile_dir=os.path.abspath(f.profile_dir), compilation_cache=f.compilation_cache)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
