"""Orbax checkpoints of a training run, and resuming from the newest intact one.

One step directory holds three items: ``state`` (the ``TrainState`` pytree: params, optimiser
state, EMA params, step, RNG), ``data`` (each process's grain iterator position) and ``config``
(the run's config as JSON, to refuse resuming another model). A run may resume on another
mesh or another number of processes. Orbax deletes old steps (``max_to_keep``) only after a
newer one is committed, so a killed run always leaves its last committed step behind.

How a step is committed is ``train.checkpoint_atomicity`` (``ATOMICITY``): ``rename`` writes
it to a temporary directory and renames that when complete (a POSIX rename is atomic);
``commit_file`` writes it in place and adds ``commit_success.txt`` last, and a step without that
file is not committed. ``auto`` (the default) is Orbax's choice: ``commit_file`` on ``gs://``
(GCS has no directory rename), ``rename`` elsewhere. On a gcsfuse mount choose ``commit_file``:
gcsfuse refuses to rename directories by default (and otherwise renames one by copying and
deleting every object, neither atomic nor quick). Either way an unfinished write found at
start-up is reported and moved to the quarantine folder, never used or deleted.

A fourth item, ``checksums``, records two 32-bit sums of every array's bits, computed on the
devices in one fused reduction (``fingerprint``; integer sums do not depend on the sharding,
so any mesh reproduces them), together with an all-finite check of the state: a step is
saved only if it is finite, and restored only if its arrays reproduce the recorded sums.
Anything that fails (unreadable, changed bits, non-finite) is reported, moved to the
quarantine folder (every copy kept) and the previous step is tried.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import re
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from dit_jax import input_pipeline, sharding, storage

ITEMS = ("state", "data", "config", "checksums")
# Orbax writes a step into ``<step>.orbax-checkpoint-tmp-<time>`` and renames it when complete (``rename``).
TMP_MARKER = ".orbax-checkpoint-tmp"
# ``train.checkpoint_atomicity``: how Orbax commits a step (see the module docstring).
ATOMICITY = {"auto": ocp.options.AtomicityMode.AUTO, "rename": ocp.options.AtomicityMode.ATOMIC_RENAME,
             "commit_file": ocp.options.AtomicityMode.COMMIT_FILE}
# Config sections that define the parameters and what they compute: a checkpoint whose values
# differ in any of them belongs to another model.
MODEL_SECTIONS = ("model", "diffusion")


class CheckpointMismatchError(ValueError):
    """The checkpoints in a directory belong to another model than the config."""


class NoIntactCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored."""


class CorruptCheckpointError(ValueError):
    """A step's arrays do not match their recorded checksums, or are not finite."""


class CheckpointSaveError(RuntimeError):
    """A background checkpoint write failed (e.g. a full disk)."""


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 (narrower types widened; PRNG keys as their key data)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)


@jax.jit
def _fingerprint(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """[n, 2] uint32 (sum of the words, sum of the words times (2 * flat index + 1)) and all-finite."""
    sums = []
    for x in leaves:
        words = _words(x)
        # The flat index from one iota per axis (no reshape: the array keeps its sharding).
        index, stride = jnp.zeros(words.shape, jnp.uint32), 1
        for axis in reversed(range(words.ndim)):
            index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
            stride *= words.shape[axis]
        # Odd weights: a single flipped bit changes the weighted sum by an odd multiple of a power of two (never
        # 0 mod 2**32), and the weights make it sensitive to moved words too.
        sums.append(jnp.stack([words.sum(dtype=jnp.uint32), (words * (2 * index + 1)).sum(dtype=jnp.uint32)]))
    finite = [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(sums), jnp.stack(finite).all() if finite else jnp.bool_(True)


def fingerprint(tree: Any) -> tuple[dict[str, list[int]], bool]:
    """(``{array path: [sum, weighted sum]}``, whether every floating-point number is finite) of ``tree``.

    One jitted reduction over the (sharded, possibly multi-process) arrays; every process gets the
    same values, and any mesh the same sums (integer addition wraps, so its order does not matter).
    """
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree))
    sums, finite = _fingerprint(list(leaves))
    # Replicated results: this process's copy (a multi-process array is not addressable as a whole).
    sums, finite = (np.asarray(a.addressable_data(0)) for a in (sums, finite))
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path in paths]
    return {name: [int(a), int(b)] for name, (a, b) in zip(names, sums)}, bool(finite)


# The largest root-mean-square parameter value a step may hold to be saved or restored. DiT's initialisation
# (Xavier-uniform, 1/sqrt(width) for a square layer: 0.03-0.05 at the paper widths 384-1152; embeddings
# N(0, 0.02); the adaLN and output layers zero) and healthy training stay far below 1, while AdamW
# moves every weight by up to ~lr per step: a limit of 10 is over 100x any paper model's initial RMS,
# reached only by a diverging run (lr=1e30: RMS 1e30 after one step, still finite), whose step is
# then neither saved nor, if an older version saved it, restored.
PARAM_RMS_LIMIT = 10.0


@jax.jit
def _rms(leaves: list[jax.Array]) -> jax.Array:
    """The root-mean-square value of the floating-point ``leaves``, scaled by their largest magnitude first so
    that it is exact where the squares would overflow float32 (inf or NaN only if a value is)."""
    leaves = [x.astype(jnp.float32) for x in leaves]
    scale = jnp.maximum(jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves])), jnp.finfo(jnp.float32).tiny)
    total = sum(jnp.sum(jnp.square(x / scale)) for x in leaves)
    return scale * jnp.sqrt(total / sum(x.size for x in leaves))


def exploded(params: Any) -> float | None:
    """The RMS of ``params`` (a pytree) if it is not finite or above ``PARAM_RMS_LIMIT``, else None."""
    leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return None
    rms = float(np.asarray(_rms(leaves).addressable_data(0)))
    return None if rms <= PARAM_RMS_LIMIT else rms


def explosion(state: Any) -> tuple[str, float] | None:
    """(``"params"`` or ``"ema_params"``, its RMS) where a train state's weights have exploded (``exploded``),
    else None: such a step is never saved, nor restored."""
    for name in ("params", "ema_params"):
        rms = exploded(getattr(state, name, None))
        if rms is not None:
            return name, rms
    return None


def atomicity_problems(atomicity: str) -> list[str]:
    """What is wrong with a ``train.checkpoint_atomicity`` value (nothing: ``[]``)."""
    if atomicity not in ATOMICITY:
        return [f"train.checkpoint_atomicity {atomicity!r} is not one of {sorted(ATOMICITY)} (commit_file on a "
                "gcsfuse mount; auto: Orbax's choice, commit_file on gs:// and rename elsewhere)"]
    return []


def create_manager(directory: str, *, every_steps: int, max_to_keep: int,
                   atomicity: str = "auto") -> ocp.CheckpointManager:
    """An async ``CheckpointManager`` saving every ``every_steps`` steps, keeping the newest ``max_to_keep``,
    committing each step as ``atomicity`` says (``ATOMICITY``). ``directory`` may be ``gs://...``."""
    problems = atomicity_problems(atomicity)
    if problems:
        raise ValueError(problems[0])
    # Unfinished writes are not deleted on start-up: ``restore_latest`` reports them and keeps them aside.
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=max_to_keep,
                                           cleanup_tmp_directories=False, enable_async_checkpointing=True,
                                           atomicity_options=atomicity_options(atomicity))
    return ocp.CheckpointManager(storage.absolute(directory), options=options, item_names=ITEMS)


def atomicity_options(atomicity: str) -> ocp.options.AtomicityOptions:
    """Orbax's options for a ``train.checkpoint_atomicity`` value (``ATOMICITY``)."""
    return ocp.options.AtomicityOptions(mode=ATOMICITY[atomicity])


def is_committed(step_dir: storage.PathLike, options: ocp.options.AtomicityOptions) -> bool:
    """Whether Orbax counts the step directory ``step_dir`` as committed under ``options``: ``commit_file``
    (``auto`` on ``gs://``) needs its ``commit_success.txt``, ``rename`` its final name. The one test of a step,
    for resuming a run and for loading a workdir's weights."""
    return ocp.step.is_path_finalized(storage.path(step_dir), atomicity_options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator: grain.DatasetIterator,
         config: ml_collections.ConfigDict, *, checksums: dict[str, list[int]], force: bool = False) -> bool:
    """Start an async save of ``step`` with ``checksums`` (``fingerprint(state)[0]``; only on the manager's
    schedule unless ``force``); True if started. Raises ``CheckpointSaveError`` if the previous save failed."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain_checkpoint.CheckpointSave(iterator),
                              config=ocp.args.JsonSave(config.to_dict()),
                              checksums=ocp.args.JsonSave({"version": 1, "arrays": checksums}))
    with _reporting_failed_saves(manager):
        return manager.save(step, args=args, force=force)


def _step_directories(manager: ocp.CheckpointManager) -> tuple[list[int], list[str]]:
    """(the committed steps, the names of the writes that never committed) in the manager's directory.

    Unfinished are temporary directories (``rename``) and step directories that Orbax does not count
    as committed (``commit_file``: no ``commit_success.txt``).
    """
    directory = storage.path(str(manager.directory))
    names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    options = manager._options.atomicity_options  # pylint: disable=protected-access  (no public accessor)
    unfinished = [n for n in names if TMP_MARKER in n or (n.isdigit() and not is_committed(directory / n, options))]
    return sorted(int(n) for n in names if n.isdigit() and n not in unfinished), unfinished


@contextlib.contextmanager
def _reporting_failed_saves(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Turn the error of a failed background save into one ``CheckpointSaveError`` line that names the step,
    its path, the last committed step and what to do."""
    try:
        yield
    except Exception as e:
        directory = str(manager.directory)
        committed, unfinished = _step_directories(manager)
        failed = (f"step {unfinished[-1].split('.')[0]} ({storage.path(directory) / unfinished[-1]})" if unfinished
                  else f"a step in {directory}")
        last = (f"the last committed checkpoint is step {committed[-1]}" if committed
                else "no checkpoint has been committed")
        text = str(e).strip()
        reason = "no space left on device" if "No space left" in text else (text.splitlines() or [""])[-1][:300]
        raise CheckpointSaveError(
            f"saving the checkpoint of {failed} failed: {reason}; {last}. Free space on that disk (or fix its "
            "permissions) and rerun the same command: it resumes from the last committed step.") from None


class _OrbaxErrors(std_logging.Filter):
    """Drops the ERROR records of Orbax's own modules (each with a traceback; a full disk made 38-205 of
    them): every Orbax failure in a run is raised into this module, which reports it in one line
    (``CheckpointSaveError``; a step that cannot be restored: its reason)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_ERRORS = _OrbaxErrors()


def one_line_failures() -> None:
    """From now on in this process, leave Orbax's error records to this module's one-line reports, unless
    ``--verbosity`` is 1 or more (absl's; then they show with their tracebacks). For good, not while a
    manager is open: Orbax's background threads still log after ``close`` has raised the failure."""
    logger = logging.get_absl_logger()
    if logging.get_verbosity() < 1 and _ORBAX_ERRORS not in logger.filters:
        logger.addFilter(_ORBAX_ERRORS)


def check_saves(manager: ocp.CheckpointManager, pending: bool) -> bool:
    """Raise ``CheckpointSaveError`` as soon as the ``pending`` background save has failed; whether one is
    still pending (cheap: call it every step, with True after starting a save)."""
    if not pending or manager.is_saving_in_progress():
        return pending
    with _reporting_failed_saves(manager):
        manager.wait_until_finished()  # done: returns at once, or raises the save's error
    return False


def close(manager: ocp.CheckpointManager) -> None:
    """Wait for the last background save and close ``manager``; a failed save raises ``CheckpointSaveError``."""
    with _reporting_failed_saves(manager):
        manager.close()


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


def _quarantine(manager: ocp.CheckpointManager, names: list[str], quarantine_dir: str) -> list[str]:
    """Move step directories (by name) out of the manager's way, kept for inspection: a name already in
    ``quarantine_dir`` gets a suffix (``30.1``, ``30.2``, ...), so no earlier copy is lost. Their new paths."""
    moved = []
    if sharding.is_main_process():
        storage.path(quarantine_dir).mkdir(parents=True, exist_ok=True)
        for name in names:
            target, copy = storage.path(quarantine_dir) / name, 0
            while target.exists():
                copy += 1
                target = storage.path(quarantine_dir) / f"{name}.{copy}"
            # A rename (on GCS: each object copied, then deleted; a kill part-way leaves parts in both places).
            (storage.path(str(manager.directory)) / name).rename(target)
            moved.append(os.fspath(target))
        logging.warning("%s", quarantine_report(quarantine_dir))
    sharding.sync_processes("dit_jax_checkpoint_quarantine")
    manager.reload()
    return moved


def _tree_bytes(folder: Any) -> int:
    """The bytes of the files under ``folder`` (an ``epath.Path``; no recursive glob: GCS refuses it)."""
    return sum(_tree_bytes(p) if p.is_dir() else p.stat().length for p in folder.iterdir())


def quarantine_report(quarantine_dir: str) -> str:
    """One line: how many set-aside steps ``quarantine_dir`` holds and their size (they are never deleted)."""
    folder = storage.path(quarantine_dir)
    steps = [p for p in folder.iterdir() if p.is_dir()]
    size = _tree_bytes(folder)
    amount = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    return (f"{quarantine_dir} holds {len(steps)} set-aside checkpoint step(s), {amount} in all; they "
            "are kept for inspection and never deleted: remove them when you no longer need them")


def _set_aside_unfinished_writes(manager: ocp.CheckpointManager, quarantine_dir: str) -> None:
    """Report the writes that never finished (a killed or failed save: ``_step_directories``) and keep them in
    ``quarantine_dir`` (Orbax would delete them)."""
    directory = str(manager.directory)
    unfinished = _step_directories(manager)[1] if sharding.is_main_process() else []
    if not int(multihost_utils.broadcast_one_to_all(np.int32(len(unfinished)))):  # every process must agree
        return
    for name, target in zip(unfinished, _quarantine(manager, unfinished, quarantine_dir)):
        logging.warning("%s is the unfinished write of checkpoint step %s (the run was killed or failed while "
                        "saving it); moved to %s, not used", storage.path(directory) / name, name.split(".")[0],
                        target)


def _verify(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Raise ``CorruptCheckpointError`` if the restored ``state`` of ``step`` is not finite or does not
    reproduce the checksums recorded when it was saved (steps written before checksums are only warned of)."""
    sums, finite = fingerprint(state)
    if (storage.path(str(manager.directory)) / str(step) / "checksums").is_dir():
        # First: changed bits explain anything else (damaged bytes often decode to NaN).
        recorded = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())).checksums
        changed = [name for name in sums if recorded["arrays"].get(name) != sums[name]]
        changed += sorted(set(recorded["arrays"]) - set(sums))
        if changed:
            raise CorruptCheckpointError(
                f"{len(changed)} of its {len(sums)} arrays differ from the checksums recorded when it was saved "
                f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): its files changed after they "
                "were written (a damaged disk or copy)")
    else:
        logging.warning("checkpoint step %d has no checksums (written by an older version): its arrays cannot be "
                        "verified", step)
    if not finite:
        raise CorruptCheckpointError("it holds non-finite numbers (NaN or inf): it was saved by a run that diverged")
    exploded_weights = explosion(state)
    if exploded_weights is not None:
        name, rms = exploded_weights
        raise CorruptCheckpointError(f"its {name} have exploded (RMS {rms:.3g}, over the limit {PARAM_RMS_LIMIT:g}): "
                                     "it was saved by a run that diverged")


def error_line(error: Exception, limit: int = 500) -> str:
    """``error`` as one readable line: its type and first line, without the JSON spec TensorStore appends;
    beyond ``limit`` characters its middle is left out (the end of a TensorStore error is the cause)."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", text)
    if len(text) > limit:
        text = f"{text[:limit // 2]} ... {text[-limit // 2:]}"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _plain_reason(step_dir: str, error: Exception) -> str:
    """Why a step could not be restored, in words."""
    if isinstance(error, CorruptCheckpointError):
        return str(error)
    if storage.path(step_dir).is_dir() and not any(storage.path(step_dir).iterdir()):
        return "its directory is empty (the write was killed before anything was saved)"
    line = error_line(error)
    if isinstance(error, FileNotFoundError) or "does not exist" in line or "No such file" in line:
        return f"a file of it is missing ({line})"
    return f"its files cannot be read: truncated or damaged ({line})"


def _restore_position(manager: ocp.CheckpointManager, step: int, iterator: grain.DatasetIterator,
                      batches: int) -> None:
    """Set ``iterator`` to this process's saved position, or from the step count if the checkpoint
    was written by a different number of processes (grain keeps one file per process)."""
    data_dir = storage.path(str(manager.directory)) / str(step) / "data"
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = sorted(f.name for f in data_dir.iterdir() if f.name.startswith("process_")) if data_dir.is_dir() else []
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
    a truncated or missing file, an empty directory), whose arrays do not match their recorded
    checksums, or that hold non-finite numbers are reported and moved to ``quarantine_dir``, as are
    the temporary directories of unfinished writes. Raises ``CheckpointMismatchError`` if a
    checkpoint holds another model, and ``NoIntactCheckpointError`` if checkpoints exist but none
    can be restored.
    """
    _set_aside_unfinished_writes(manager, quarantine_dir)
    failures: list[tuple[int, str]] = []

    def unreadable(step: int, error: Exception) -> None:
        reason = _plain_reason(os.fspath(storage.path(str(manager.directory)) / str(step)), error)
        logging.warning("checkpoint step %d in %s is corrupt or incomplete: %s; trying the previous one",
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
            _verify(manager, step, state)
            _restore_position(manager, step, iterator, int(state.step))
        except Exception as e:
            unreadable(step, e)
            continue
        if failures:
            logging.warning("resuming from step %d; moving the newer step(s) %s that cannot be used to %s", step,
                            [s for s, _ in failures], quarantine_dir)
            _quarantine(manager, [str(s) for s, _ in failures], quarantine_dir)
        _warn_of_changes(saved_config, config, step)
        return state
    if failures:
        raise NoIntactCheckpointError(
            f"none of the checkpoints in {manager.directory} can be restored:\n"
            + "\n".join(f"  step {s}: {r}" for s, r in failures)
            + f"\nNothing was deleted. Move {manager.directory} away (or use a new --workdir) to start from scratch.")
    return None


def _warn_of_changes(saved: dict[str, Any], config: ml_collections.ConfigDict, step: int) -> None:
    """Log the run settings that differ from the checkpoint's; explain what a new batch size changes."""
    differences = config_differences(saved, config, ("train", "data", "sample", "mesh"))
    differences = [d for d in differences if not d.startswith("train.steps:")]  # raising it continues a run
    if differences:
        logging.warning("resuming step %d with settings that differ from its run: %s", step, "; ".join(differences))
    old, new = saved.get("train", {}).get("batch_size"), config.train.batch_size
    if old is not None and old != new:
        logging.warning(
            "train.batch_size changes from %d to %d at step %d: every step now trains on %d examples (%.3gx the "
            "gradient's sample); the input continues at batch %d of the new size, i.e. at example %d of the "
            "shuffled order instead of %d (a different point of the epoch); train.lr, the warmup, the schedule and "
            "the EMA decay stay per step (scale train.lr yourself if the batch size should change it)",
            old, new, step, new, new / old, step, step * new, step * old)
