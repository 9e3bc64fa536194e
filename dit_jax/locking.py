"""One writer per output folder: a lock file that names its holder (host, pid, start time).

A training run locks its ``--workdir`` and the latent extractor its ``--out``, so a second
command on the same folder refuses at once instead of interleaving logs and checkpoints:

    with locking.hold(workdir, purpose="training run"):
        ...

The lock is ``FOLDER/dit_jax.lock``, a small JSON file created atomically (``O_EXCL``) and
removed when the holder exits normally. A holder that died (SIGKILL, a crash, a lost host)
leaves it behind:

- on the same host it is detected (the pid is gone, or belongs to a younger process) and
  the lock is taken over with a warning;
- from another host the holder cannot be checked: the refusal says so, and rerunning with
  ``DIT_JAX_TAKE_OVER_LOCK=1`` takes the lock over (only do this when the holder is gone).

In a multi-process run (a pod) only process 0 takes the lock, once per run; the other
processes learn whether it succeeded and fail with it.

A folder in a bucket (``gs://bucket/run``) is locked the same way: the lock object is created
with GCS's does-not-exist precondition (``ifGenerationMatch=0``, through google-cloud-storage,
which Orbax needs for ``gs://`` anyway), so of two commands starting at once exactly one gets
it. There is no folder flock on GCS: the check for a stale holder and its take-over are not
serialised between two commands that start in the same instant (each still creates the lock
with the precondition, so at most one of them proceeds).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from dit_jax import storage

LOCK_FILE = "dit_jax.lock"
TAKE_OVER_ENV = "DIT_JAX_TAKE_OVER_LOCK"


class LockHeldError(RuntimeError):
    """Another command holds the folder's lock."""


class UnusableFolderError(ValueError):
    """The folder cannot hold a lock: its path is a file, or it cannot be written (a read-only disk, no permission)."""


def _unusable(directory: str, err: OSError) -> UnusableFolderError:
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return UnusableFolderError(f"{directory} is a file, not a folder (or a path through a file): give a folder")
    return UnusableFolderError(f"cannot write in {directory}: {err.strerror or err} (a read-only disk or a folder "
                               "without write permission?); give a writable folder")


def _process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, from /proc), to tell a reused pid; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may hold spaces, so count from its closing bracket.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _holder_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the lock's holder still runs: True/False on this host, None when it cannot be known."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    ticks = holder.get("start_ticks")
    return ticks is None or _process_start_ticks(pid) in (None, ticks)


def _read(path: str) -> dict[str, Any] | None:
    """The holder recorded in ``path``; None if it is gone or unreadable (a write killed half-way)."""
    try:
        holder = json.loads(storage.path(path).read_text())
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def describe(holder: dict[str, Any]) -> str:
    """``purpose on host H, pid P, started T (command)`` of a lock file's contents."""
    command = " ".join(holder.get("command", []))
    return (f"{holder.get('purpose', 'a command')} on host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}" + (f" ({command[:200]})" if command else ""))


@contextlib.contextmanager
def _directory_guard(directory: str) -> Iterator[None]:
    """Serialise check-and-take-over between commands of this host (flock on the folder itself; a bucket
    has no flock: there the create's precondition alone decides)."""
    if storage.is_bucket(directory):
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: the O_EXCL create still decides
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire(directory: str, *, purpose: str, take_over: bool | None = None) -> dict[str, Any]:
    """Lock ``directory`` (created if needed) for this process; returns what the lock file records.

    Raises ``LockHeldError`` naming the holder if another live (or, on another host, possibly
    live) command holds it, ``UnusableFolderError`` if the folder is a file or cannot be written.
    ``take_over`` (default: env ``DIT_JAX_TAKE_OVER_LOCK=1``) replaces any existing lock.
    """
    if take_over is None:
        take_over = os.environ.get(TAKE_OVER_ENV, "") not in ("", "0")
    try:
        storage.path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unusable(directory, err) from None
    path = os.fspath(storage.path(directory) / LOCK_FILE)
    mine = {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "start_ticks": _process_start_ticks(os.getpid()),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": sys.argv, "token": uuid.uuid4().hex}
    with _directory_guard(directory):
        if storage.path(path).exists():
            holder = _read(path)
            alive = None if holder is None else _holder_alive(holder)
            what = describe(holder) if holder else "an unreadable lock (its writer was killed)"
            if take_over or holder is None or alive is False:
                logging.warning("taking over the lock %s of %s: %s", path, what,
                                f"{TAKE_OVER_ENV} is set" if take_over else "that process is no longer running")
                storage.path(path).unlink()
            else:
                how = ("if it is no longer running (a run killed on another host leaves its lock behind), rerun "
                       f"with {TAKE_OVER_ENV}=1 to take the lock over" if alive is None else
                       "that process is still running")
                raise LockHeldError(f"{directory} is in use by {what}. Wait for it to finish or stop it, or use "
                                    f"another folder; {how}. (Lock file: {path})")
        _create(path, json.dumps(mine), directory)
    return mine


def _create(path: str, text: str, directory: str) -> None:
    """Create the lock file ``path`` holding ``text``; ``LockHeldError`` if it appeared meanwhile."""
    if not storage.is_bucket(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            raise LockHeldError(f"{directory} was locked at the same moment by "
                                f"{describe(holder) if holder else 'another command'}; wait for it to finish or use "
                                f"another folder. (Lock file: {path})") from None
        except OSError as err:
            raise _unusable(directory, err) from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    if not path.startswith("gs://"):
        raise ValueError(f"{directory}: of the buckets, only gs:// folders can be locked")
    from google.api_core import exceptions
    from google.cloud import storage as gcs

    bucket, _, name = path.removeprefix("gs://").partition("/")
    try:
        gcs.Client().bucket(bucket).blob(name).upload_from_string(text, content_type="application/json",
                                                                   if_generation_match=0)
    except exceptions.PreconditionFailed:
        holder = _read(path)
        raise LockHeldError(f"{directory} was locked at the same moment by "
                            f"{describe(holder) if holder else 'another command'}; wait for it to finish or use "
                            f"another folder. (Lock file: {path})") from None


def release(directory: str, lock: dict[str, Any]) -> None:
    """Remove the lock file if it is still ``lock`` (not taken over meanwhile)."""
    path = os.fspath(storage.path(directory) / LOCK_FILE)
    holder = _read(path)
    if holder is not None and holder.get("token") == lock["token"]:
        with contextlib.suppress(FileNotFoundError):
            storage.path(path).unlink()
    elif holder is not None:
        logging.warning("the lock %s was taken over by %s while this command held it", path, describe(holder))


@contextlib.contextmanager
def hold(directory: str, *, purpose: str, take_over: bool | None = None) -> Iterator[dict[str, Any] | None]:
    """Hold the lock of ``directory`` for the block: process 0 takes it, once for a multi-process run.

    Every process raises ``LockHeldError`` (or ``UnusableFolderError``) if process 0 could not take it.
    Yields the lock's record on process 0, None on the others. A folder the lock created is removed
    again if the block leaves it empty (a refused start leaves no empty workdir behind).
    """
    import jax  # here, so the lock (and its tests) need no devices in a single process

    multi = jax.process_count() > 1
    lock, error, created = None, None, []
    if jax.process_index() == 0 and not storage.is_bucket(directory):
        created = _missing_folders(directory)
    if jax.process_index() == 0:
        try:
            lock = acquire(directory, purpose=purpose, take_over=take_over)
        except (LockHeldError, UnusableFolderError) as e:
            error = e
    if multi:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if error is None and not int(ok):
            error = LockHeldError(f"process 0 could not lock {directory} (see its log)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            if created:
                _remove_empty_folders(directory)
            release(directory, lock)
            for folder in created:  # only while empty: never anything another command wrote
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def _missing_folders(directory: str) -> list[str]:
    """``directory`` and those of its parents that do not exist yet, innermost first (what ``acquire`` makes)."""
    missing, folder = [], os.path.abspath(directory)
    while not os.path.lexists(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_empty_folders(directory: str) -> None:
    """Remove the empty folders under ``directory`` if it holds no file but the lock (a run refused at its start)."""
    tree = list(os.walk(directory, topdown=False))
    if any(files for root, _, files in tree if root != directory) or set(tree[-1][2]) - {LOCK_FILE}:
        return
    for root, _, _ in tree[:-1]:
        with contextlib.suppress(OSError):
            os.rmdir(root)
