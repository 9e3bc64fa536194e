"""Where a run's files live: a local folder or a bucket (``gs://bucket/...``), through ``etils.epath``.

Every command reads and writes its outputs (the training workdir, latent shards, sample blocks,
evaluation results) as ``epath.Path``; with TensorFlow installed, epath reaches ``gs://`` through
``tf.io.gfile`` (TensorFlow's GCS client), as TensorBoard's event writer does. Orbax writes the
arrays of a checkpoint with TensorStore's own GCS driver, and grain reads ArrayRecord shards with
array_record's own GCS reader.

A write that a kill must not leave half-done (``write_atomic``, ``publish``) is a temporary file
renamed over the final name on a local disk. On GCS a rename is a copy and a delete, but an
object only appears once its upload has completed, whole: there the final object is written
directly, which is the atomic choice (a reader sees the old object or the new one).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_bucket(path: PathLike) -> bool:
    """Whether ``path`` is an object-store URI (``gs://...``, ``s3://...``), not a local path."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", os.fspath(path)) is not None


def path(p: PathLike) -> epath.Path:
    """``p`` (a local path or a ``gs://`` URI) as an ``epath.Path``."""
    return epath.Path(p)


def absolute(p: PathLike) -> str:
    """A path as a user typed it, resolved once where it enters (a flag, a config field, a library call).

    A local path gets ``~`` expanded, is made absolute and loses a trailing slash; a URI
    (``gs://...``) is returned as it is. Orbax and TensorStore refuse relative paths (Orbax
    reports the refusal as a missing checkpoint), and a workdir or output recorded in a run's
    settings must still name the same place when read from another directory.
    """
    return os.fspath(p) if is_bucket(p) else os.path.abspath(os.path.expanduser(os.fspath(p)))


def write_atomic(dest: PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``dest`` so that a reader (or a kill) sees the old contents or all of the new.

    Locally: a temporary file, flushed to the disk, renamed over ``dest``. In a bucket: one object
    upload, which is atomic (no temporary object: a rename there would be a copy and a delete).
    """
    if is_bucket(dest):
        epath.Path(dest).write_bytes(data.encode() if isinstance(data, str) else data)
        return
    tmp = f"{os.fspath(dest)}.tmp"
    with open(tmp, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def publish(local_file: PathLike, dest: PathLike) -> None:
    """Give a finished local file its final name ``dest`` (a kill leaves no half file under it).

    Locally the file is flushed to the disk and renamed. For a bucket it is uploaded as one object
    (complete or absent), then the local file is removed: array_record and the image writers
    write only local files.
    """
    if is_bucket(dest):
        with open(local_file, "rb") as src, epath.Path(dest).open("wb") as out:
            shutil.copyfileobj(src, out, 16 << 20)  # streamed; the object appears when the upload completes
        os.remove(local_file)
        return
    with open(local_file, "rb") as f:
        os.fsync(f.fileno())
    os.replace(local_file, dest)


def sha256_file(path: PathLike) -> str:
    """The hex SHA-256 of a file (local or in a bucket), read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def read_json(file: PathLike) -> dict[str, Any]:
    """A JSON file's contents; a damaged file (cut short, not JSON) is a ValueError naming it."""
    try:
        return json.loads(path(file).read_text())
    except ValueError as err:
        raise ValueError(f"{file} is damaged (not valid JSON: {err})") from None


def write_json_atomic(path: PathLike, value: dict[str, Any]) -> None:
    """Readers see the old file or the whole new one (``write_atomic``)."""
    write_atomic(path, json.dumps(value, indent=1))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


def json_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``field: was OLD, now NEW`` for every leaf that differs between two JSON records (nested fields as
    ``a.b``): what a resumable folder recorded against what this run asks for."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)
                for line in json_differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [f"{prefix[:-1]}: was {_short(old)}, now {_short(new)}"]
