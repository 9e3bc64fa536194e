"""The Inception features of an ADM batch, and of a reference (its statistics, cached by content).

Each process reads its contiguous share of a batch and all get every feature, in file order.
What a reference's images give with given weights is kept under the download cache, keyed by
the file's content (its zip directory's CRC-32s and sizes) and the weights' SHA-256; a reference
whose statistics record other Inception weights is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from dit_jax import storage
from dit_jax.fid import inception, metrics
from dit_jax.fid.adm_npz import BadBatch, NpzImages, Reference
from dit_jax.weights import fetch

CACHE_FOLDER, CACHE_FORMAT = "reference_features", 1  # under weights.fetch.cache_dir()


class InceptionWeights(NamedTuple):
    """The network's tensors, where they came from (a path or ``random:SEED``) and their ``weights_sha256``."""

    tensors: dict[str, np.ndarray]
    source: str
    sha256: str


def read_weights(weights: str | None) -> InceptionWeights:
    """The Inception weights ``--inception_weights`` names, checked (one error lists every problem)."""
    tensors, source = inception.read_inception_weights(weights)
    inception.check_weights(tensors, source)
    return InceptionWeights(tensors, source, inception.weights_sha256(tensors))


def weight_record(weights: InceptionWeights) -> dict[str, str]:
    """What a reference batch records about the weights of its statistics (``adm_npz.WEIGHT_RECORDS``, read back
    by ``check_reference_weights``): the file's name, the tensors' hash (the same in any container) and, for a
    file (not random weights), the file's SHA-256."""
    record = {"inception_weights": os.path.basename(weights.source), "inception_weights_sha256": weights.sha256}
    if inception.random_seed(weights.source) is None:
        record["inception_sha256"] = storage.sha256_file(weights.source)
    return record


def check_reference_weights(reference: Reference, path: str, weights: InceptionWeights) -> list[str]:
    """Refuse (one line) a reference whose precomputed statistics came from other Inception weights; notes.

    A reference without statistics needs no check: everything about it is computed here, with ``weights``.
    """
    if not reference.statistics:
        return []
    record, random = reference.weights, inception.random_seed(weights.source) is not None
    rebuild = f"python -m dit_jax.reference_batch --inception_weights {weights.source}"
    if not record.get("inception_weights_sha256") and not record.get("inception_sha256"):
        if random:
            raise BadBatch(f"{path} records no Inception weights (ADM's batches record none), so its statistics "
                           f"come from the real FID network; random weights ({weights.source}) cannot be compared "
                           f"with them: smoke-test against a reference with only arr_0, or one built by {rebuild}")
        return [f"{path} records no Inception weights hash (ADM's reference batches record none): its statistics are "
                f"taken to come from the FID network, as {os.path.basename(weights.source)} should be"]
    if record.get("inception_weights_sha256"):
        recorded, ours, what = record["inception_weights_sha256"], weights.sha256, "tensors"
    else:  # built before the tensors' hash was recorded: the weight file's
        recorded, what = record["inception_sha256"], "file"
        ours = "(no file)" if random else storage.sha256_file(weights.source)
    if recorded != ours:
        raise BadBatch(f"{path}'s statistics were computed with other Inception weights "
                       f"({record.get('inception_weights', '?')}, {what} SHA-256 {recorded[:16]}...) than "
                       f"{weights.source} ({ours[:16]}...), so FID and sFID against it would mean nothing: pass the "
                       f"weights it names, or rebuild it with {rebuild}")
    return []


def reference_identity(path: str) -> str:
    """What identifies a reference file's content for the feature cache: its zip directory's member names,
    CRC-32s and sizes (read without reading the 1-2 GB of data; a copy or a new download of the same file
    hits, any change to an array misses; an mtime would miss on every copy and hit a same-size edit)."""
    with storage.path(path).open("rb") as f, zipfile.ZipFile(f) as z:
        return json.dumps(sorted((i.filename, i.CRC, i.file_size) for i in z.infolist()))


def feature_cache_path(path: str, weights_sha256: str) -> Path:
    """Where what is computed from ``path``'s images with these weights is kept (``reference_features``)."""
    key = json.dumps({"format": CACHE_FORMAT, "reference": reference_identity(path), "weights": weights_sha256})
    return fetch.cache_dir() / CACHE_FOLDER / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _read_cache(cache: Path | None) -> dict[str, np.ndarray] | None:
    """The cached arrays (None if absent or unreadable), found by every process or used by none."""
    found = None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as data:
                found = {k: data[k] for k in data.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            logging.warning("ignoring the unreadable reference feature cache %s (%s); computing again", cache, err)
    if jax.process_count() > 1 and not np.asarray(multihost_utils.process_allgather(np.array(found is not None))).all():
        return None
    return found


def reference_features(reference: Reference, features: inception.FeatureFn, *, chunk: int = 256,
                       progress: bool = True, cache: Path | None = None) -> dict[str, Any]:
    """What ``metrics.compute_metrics`` compares with: the reference's statistics (those it lacks from its
    images' features) and its images' ``pool`` features (precision/recall).

    ``cache`` (``feature_cache_path``): what the images give is read from there if present, else
    computed and written there (by process 0), so a second evaluation skips the reference's images.
    """
    out: dict[str, Any] = dict(reference.statistics)
    if reference.images is None:
        return out
    computed = _read_cache(cache)
    if computed is None:
        feats = batch_features(reference.images, features, chunk=chunk, progress=progress, label="reference")
        computed = {"pool": feats["pool"]}
        for name, mu, sigma in (("pool", "mu", "sigma"), ("spatial", "mu_s", "sigma_s")):
            if mu not in reference.statistics:
                computed[mu], computed[sigma] = metrics.statistics(feats[name])
        if cache is not None and jax.process_index() == 0 and np.isfinite(feats["pool"]).all():
            buffer = io.BytesIO()
            np.savez(buffer, **computed)
            cache.parent.mkdir(parents=True, exist_ok=True)
            storage.write_atomic(cache, buffer.getvalue())
    return {**computed, **out}


def batch_features(images: NpzImages, features: inception.FeatureFn, *, chunk: int,
                   progress: bool = True, label: str = "") -> dict[str, np.ndarray]:
    """Features of every image of ``images``: each process reads its contiguous share; all get all, in file order."""
    n, count, index = len(images), jax.process_count(), jax.process_index()
    shares = [(n * p // count, n * (p + 1) // count) for p in range(count)]
    steps = -(-max(stop - start for start, stop in shares) // chunk)
    per_process: list[dict[str, list[np.ndarray]]] = [{"pool": [], "spatial": [], "logits": []} for _ in shares]
    bar = tqdm.tqdm(total=n, unit="img", desc=label, file=sys.stderr, disable=not progress or index != 0)
    chunks = images.chunks(*shares[index], chunk)
    for step in range(steps):  # every process runs the same number of (possibly empty) steps
        local = next(chunks, np.zeros((0,) + tuple(images.shape[1:]), np.uint8))
        feats = features(local)  # all processes' rows of this step, process 0's first
        offset = 0
        for p, (start, stop) in enumerate(shares):
            size = min(max(stop - start - step * chunk, 0), chunk)
            for k, v in feats.items():
                per_process[p][k].append(v[offset:offset + size])
            offset += size
        bar.update(offset)
    bar.close()
    return {k: np.concatenate([part for proc in per_process for part in proc[k]]) for k in ("pool", "spatial", "logits")}
