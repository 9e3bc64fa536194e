"""Orbax checkpoints of a training run, and resuming from the newest intact one.

One step directory holds three items: ``state`` (the ``TrainState`` pytree: params, optimiser
state, EMA params, step, RNG), ``data`` (each process's grain iterator position) and ``config``
(the run's config as JSON, to refuse resuming another model). A run may resume on another
mesh or another number of processes. Orbax writes a step to a
temporary directory and renames it when complete, and deletes old steps (``max_to_keep``) only
after a newer one is committed, so a killed run always leaves its last committed step behind.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from dit_jax import input_pipeline, sharding

ITEMS = ("state", "data", "config")
# Config sections that define the parameters and what they compute: a checkpoint whose values
# differ in any of them belongs to another model.
MODEL_SECTIONS = ("model", "diffusion")


class CheckpointMismatchError(ValueError):
    """The checkpoints in a directory belong to another model than the config."""


class NoIntactCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored."""


def create_manager(directory: str, *, every_steps: int, max_to_keep: int) -> ocp.CheckpointManager:
    """An async ``CheckpointManager`` saving every ``every_steps`` steps, keeping the newest ``max_to_keep``."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=max_to_keep,
                                           cleanup_tmp_directories=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator: grain.DatasetIterator,
         config: ml_collections.ConfigDict, *, force: bool = False) -> bool:
    """Start an async save of ``step`` (only on the manager's schedule unless ``force``); True if started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain_checkpoint.CheckpointSave(iterator),
                              config=ocp.args.JsonSave(config.to_dict()))
    return manager.save(step, args=args, force=force)


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict,
                       sections: tuple[str, ...]) -> list[str]:
    """``section.field: saved -> current`` for each field of ``sections`` present in both and different."""
    current = json.loads(json.dumps(config.to_dict()))  # as saved: tuples become lists
    out = []
    for section in sections:
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(old.keys() & new.keys()):
            if old[key] != new[key]:
                out.append(f"{section}.{key}: {old[key]!r} -> {new[key]!r}")
    return out


def _quarantine(manager: ocp.CheckpointManager, steps: list[int], quarantine_dir: str) -> None:
    """Move unreadable step directories out of the manager's way (kept for inspection, not deleted)."""
    if sharding.is_main_process():
        os.makedirs(quarantine_dir, exist_ok=True)
        for step in steps:
            target = os.path.join(quarantine_dir, str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(os.path.join(str(manager.directory), str(step)), target)
    multihost_utils.sync_global_devices("dit_jax_checkpoint_quarantine")
    manager.reload()


def _restore_position(manager: ocp.CheckpointManager, step: int, iterator: grain.DatasetIterator,
                      batches: int) -> None:
    """Set ``iterator`` to this process's saved position, or from the step count if the checkpoint
    was written by a different number of processes (grain keeps one file per process)."""
    data_dir = os.path.join(str(manager.directory), str(step), "data")
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = sorted(f for f in os.listdir(data_dir) if f.startswith("process_")) if os.path.isdir(data_dir) else []
    if own in saved or not saved:  # no files at all: let grain report the missing data
        manager.restore(step, args=ocp.args.Composite(data=grain_checkpoint.CheckpointRestore(iterator)))
        return
    input_pipeline.seek(iterator, batches)
    logging.warning("checkpoint step %d was written by %s process(es), this run has %d: each process's input "
                    "continues after batch %d (the same examples; new augmentation draws)",
                    step, saved[0].split("-of-")[-1].removesuffix(".json"), jax.process_count(), batches)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, iterator: grain.DatasetIterator,
                   config: ml_collections.ConfigDict, *, quarantine_dir: str) -> Any | None:
    """Restore the newest intact checkpoint onto ``abstract_state``'s shardings; ``None`` if there is none.

    Sets ``iterator`` to the saved data position. Newer steps that cannot be read (a killed write,
    a truncated or missing file, an empty directory) are reported and moved to ``quarantine_dir``.
    Raises ``CheckpointMismatchError`` if a checkpoint holds another model, and
    ``NoIntactCheckpointError`` if checkpoints exist but none can be read.
    """
    failures: list[tuple[int, str]] = []

    def unreadable(step: int, error: Exception) -> None:
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        logging.warning("checkpoint step %d in %s is corrupt or incomplete (%s); trying the previous one",
                        step, manager.directory, reason)
        failures.append((step, reason))

    for step in reversed(manager.all_steps()):
        # Any failure to read a step means it is not intact.
        try:
            saved_config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as e:
            unreadable(step, e)
            continue
        differences = config_differences(saved_config, config, MODEL_SECTIONS)
        if differences:
            raise CheckpointMismatchError(
                f"{manager.directory} holds checkpoints of another model (step {step}): " + "; ".join(differences)
                + ". Use a new --workdir for this config, or run with the checkpoint's config to resume it.")
        try:
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
            _restore_position(manager, step, iterator, int(state.step))
        except Exception as e:
            unreadable(step, e)
            continue
        if failures:
            logging.warning("resuming from step %d; moving the unreadable newer step(s) %s to %s", step,
                            [s for s, _ in failures], quarantine_dir)
            _quarantine(manager, [s for s, _ in failures], quarantine_dir)
        return state
    if failures:
        raise NoIntactCheckpointError(
            f"none of the checkpoints in {manager.directory} can be restored: "
            + "; ".join(f"step {s}: {r}" for s, r in failures)
            + ". Move them away (or use a new --workdir) to start from scratch.")
    return None
