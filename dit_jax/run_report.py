"""What a finished training run prints last: its wall time, its loss, and its final evaluations in words.

A few plain lines on stdout (``main``), so a user sees at the end what the run took and reached
without reading ``summary.json``; every figure is in that file too.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from dit_jax import console, run_log, storage
from dit_jax.evaluators import common as evaluators


def final_lines(summary: dict[str, Any], evals: ml_collections.ConfigDict, workdir: str,
                wall_seconds: float) -> list[str]:
    """The lines for ``summary`` (``train.train_and_evaluate``'s) of a run in ``workdir`` that took ``wall_seconds``
    in all; ``evals`` is its ``config.evals``."""
    steps, resumed = summary["steps"], summary["resumed_from_step"]
    train_s, eval_s = summary["train_seconds"], summary["eval_seconds"]
    if summary["steps_per_sec"]:
        trained = (f"training {console.clock(train_s)} ({steps - resumed:,} steps at {summary['steps_per_sec']:.3g} "
                   f"steps/s, compilation included)")
    else:
        trained = "no training (the run had finished: its last step evaluated again)"
    where = f" (resumed from step {resumed:,})" if resumed else ""
    lines = [f"finished: {steps:,} steps{where} in {console.clock(wall_seconds)} in all: {trained}, evaluation "
             f"{console.clock(eval_s)}, the rest (start-up, data, checkpoints) "
             f"{console.clock(max(wall_seconds - train_s - eval_s, 0.0))}"]
    if summary["first_loss"] is not None:  # None: metrics.jsonl of a finished run was lost
        windows = [(summary["first_loss_steps"], summary["first_loss"])]
        if summary["final_loss_steps"] != summary["first_loss_steps"]:
            windows.append((summary["final_loss_steps"], summary["final_loss"]))
        lines.append("training loss (mean of a log window): " + ", then ".join(
            f"{loss:.4f} over steps {first:,}-{last:,}" for (first, last), loss in windows))
    for name, result in summary["evals"].items():
        lines += evaluators.describe(evals[name]["type"], result, workdir)
    lines.append(f"every figure: {storage.path(workdir) / run_log.SUMMARY_FILE}; each log window and evaluation: "
                 f"{storage.path(workdir) / run_log.METRICS_FILE}")
    return lines
