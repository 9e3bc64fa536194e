"""A diverged training run stops at once, naming what went wrong and its last good checkpoint: nothing past a
non-finite loss or gradient is logged or saved, nor a state whose weights are non-finite or have exploded."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dit_jax import checkpointing


def first_non_finite(checks: list[tuple[int, dict[str, jax.Array]]]) -> tuple[int, float] | None:
    """(step, loss) of the first step whose loss or gradient norm is not finite, or None."""
    if not checks:
        return None
    steps, metrics = zip(*checks)
    # One transfer for the whole window, not two per step.
    losses, grad_norms = jax.device_get(([m["loss"] for m in metrics], [m["grad_norm"] for m in metrics]))
    bad = ~(np.isfinite(losses) & np.isfinite(grad_norms))
    return (steps[int(np.argmax(bad))], float(losses[int(np.argmax(bad))])) if bad.any() else None


def message(what: str, last_checkpoint: int | None, checkpoint_dir: str) -> str:
    """The message of a run stopped by non-finite numbers: what, and where the last good checkpoint is."""
    where = (f"the last good checkpoint is step {last_checkpoint} in {checkpoint_dir} (rerunning the same command "
             "resumes from it)" if last_checkpoint is not None else "no checkpoint was written")
    return f"{what}; stopping: {where}. Lower train.lr or check the data."


def check_metrics(checks: list[tuple[int, dict[str, jax.Array]]], last_checkpoint: int | None,
                  checkpoint_dir: str) -> None:
    """Raise ``FloatingPointError`` if a step of ``checks`` (step, metrics) had a non-finite loss or gradient norm."""
    bad = first_non_finite(checks)
    if bad is not None:
        raise FloatingPointError(message(f"non-finite loss {bad[1]} at step {bad[0]}", last_checkpoint,
                                         checkpoint_dir))


def check_state(state: Any, step: int, last_checkpoint: int | None, checkpoint_dir: str) -> dict[str, list[int]]:
    """The train state's ``checkpointing.fingerprint`` checksums; ``FloatingPointError`` if it is not finite or its
    weights exploded (finite but absurd, e.g. lr=1e30), though its loss was finite: such a step is never saved."""
    checksums, finite = checkpointing.fingerprint(state)
    if not finite:
        raise FloatingPointError(message(f"non-finite parameters after step {step}", last_checkpoint, checkpoint_dir))
    exploded_weights = checkpointing.explosion(state)
    if exploded_weights is not None:
        name, rms = exploded_weights
        raise FloatingPointError(message(
            f"the {name} exploded after step {step} (RMS {rms:.3g}, over the limit "
            f"{checkpointing.PARAM_RMS_LIMIT:g})", last_checkpoint, checkpoint_dir))
    return checksums
