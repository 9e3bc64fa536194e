"""Where a profiled train step's device time went: matmuls, attention, elementwise/normalisation,
optimiser/EMA, other, and the gaps between kernels (``python -m dit_jax.sweep --time_split``, the
sweep's profile of its fastest row).

Each op event of a saved profile is attributed to an HLO instruction (``trace.op_events``) and
classified by the compiled text (``classify``); library kernels of no instruction by name (GEMMs:
matmul, cuDNN: attention, the rest: other).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import ml_collections

from dit_jax import train
from dit_jax.models import architecture
from dit_jax.perf import trace

# The categories of ``of_profile``, in the order they are tested and printed.
CATEGORIES = ("attention", "matmul", "optimizer_ema", "elementwise_norm", "other")
# Library kernels a GPU trace names by kernel only (inside CUDA command buffers ``hlo_op`` is the
# buffer): cuBLAS (nvjet, sm90 gemm), CUTLASS and cuDNN's implicit GEMMs, Triton GEMM fusions;
# cuDNN's other kernels (fused attention forward/backward and its dO.O and dQ passes).
_GEMM_KERNEL = re.compile(r"nvjet|gemm|cutlass|cublas|xmma", re.IGNORECASE)
_CUDNN_KERNEL = re.compile(r"cudnn|fmha|sdpa|flash", re.IGNORECASE)


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


def tokens_per_image(config: ml_collections.ConfigDict) -> int:
    """Tokens per image of the config's model (its attention's sequence length)."""
    arch = architecture(config.model)
    return (arch["input_size"] // arch["patch_size"]) ** 2


def of_profile(profile_dir: str, wall_seconds: float | None = None, *, tokens: int) -> dict[str, Any]:
    """Where the profiled steps' time went: seconds per category, busy time and gaps, the top ops.

    ``profile_dir`` is a saved profile (``trace``). ``wall_seconds`` is the host-timed total of the
    profiled steps; None takes the span of the module's events in the trace. The categories sum
    event durations (on a CPU ops overlap across threads, so the split is coarse and may exceed
    the wall time); ``busy_seconds`` is the union of the events' intervals, ``gaps`` the rest of
    the wall time. ``steps`` is how many steps the trace ran (None if it does not say).
    """
    profile = trace.read_profile(profile_dir)
    seconds: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, float] = defaultdict(float)
    categories: dict[str, str] = {}
    counted = []
    for event, op in trace.op_events(profile):
        name = event.get("name", "")
        key = op or name
        if key not in categories:
            categories[key] = (classify(profile.instructions[op], profile.computations, tokens=tokens,
                                        optimizer_scope=train.OPTIMIZER_SCOPE) if op is not None
                               else "matmul" if _GEMM_KERNEL.search(name)
                               else "attention" if _CUDNN_KERNEL.search(name) else "other")
        seconds[categories[key]] += event["dur"] / 1e6
        per_op[key] += event["dur"] / 1e6
        counted.append(event)
    busy = trace.union_seconds([(e["ts"], e["ts"] + e["dur"]) for e in counted])
    if wall_seconds is None:
        wall_seconds = (max(e["ts"] + e["dur"] for e in counted) - min(e["ts"] for e in counted)) / 1e6 if counted else 0.0
    top = sorted(per_op, key=per_op.get, reverse=True)[:10]
    return {"seconds": seconds, "busy_seconds": busy, "gaps_seconds": max(wall_seconds - busy, 0.0),
            "wall_seconds": wall_seconds, "events": len(counted), "steps": trace.profiled_steps(profile),
            "top_ops": [{"op": op, "category": categories[op], "seconds": per_op[op]} for op in top]}


def format_split(split: dict[str, Any], steps: int) -> str:
    """The profile's split as lines: ms per step and share of the wall time for each category and the gaps."""
    wall = split["wall_seconds"]
    parts = [f"{name} {1e3 * value / steps:.1f} ms ({100 * value / wall:.0f}%)"
             for name, value in [*split["seconds"].items(), ("gaps", split["gaps_seconds"])]]
    top = ", ".join(f"{o['op']} ({o['category']}) {1e3 * o['seconds'] / steps:.2f} ms" for o in split["top_ops"][:5])
    return (f"per step ({1e3 * wall / steps:.1f} ms wall, {split['events']} op events): " + ", ".join(parts)
            + f"\ntop ops per step: {top}")

