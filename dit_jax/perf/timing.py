"""Timing calls for the benchmarks: seconds of each call after untimed warm-up calls, and their summary."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def timed(call: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones; each waits for its result."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float], batch: int) -> dict[str, float]:
    median = statistics.median(seconds)
    return {"step_seconds_median": median, "step_seconds_min": min(seconds),
            "step_seconds_mean": statistics.fmean(seconds), "images_per_sec": batch / median}
