"""``python -m dit_jax.evaluate``: ADM's evaluator (Inception Score, FID, sFID, precision, recall) in JAX.

    python -m dit_jax.evaluate --reference VIRTUAL_imagenet256_labeled.npz --samples samples.npz \\
        [--inception_weights PATH] [--json OUT.json]

Both files are ADM-style ``.npz``: ``arr_0`` uint8 ``[N, H, W, 3]``; a reference may also hold
``mu, sigma, mu_s, sigma_s`` (used when present; ``arr_0`` then serves precision/recall only).
Arrays are streamed from the file in batches (a 50K x 256 x 256 sample file is never loaded
whole); on several processes each takes a contiguous share and only features are gathered.

Trust: a reference built by ``dit_jax.reference_batch`` records the SHA-256 of the Inception
weights its statistics came from; another network is refused (ADM's batches record none: a
note says so). What is computed from a reference's images is cached under the download cache,
keyed by the file's content (its zip directory's CRC-32s and sizes) and the weights' SHA-256.
``--inception_weights random:SEED`` is a smoke test with random weights, labelled not comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from absl import logging

from dit_jax import compilation_cache, storage
from dit_jax.evaluators import inception, metrics
from dit_jax.weights import fetch

FIGURES = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
           ("recall", "Recall"))
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# Reference batches a user may name instead of a path (fetched into the cache): ADM's.
REFERENCE_NAMES = tuple(name for name in fetch.REGISTRY if name.endswith(".npz"))
# What a reference batch records about the weights of its statistics (dit_jax.reference_batch's metadata):
# the name, the SHA-256 of the tensors (inception.weights_sha256) and, for files, of the file.
WEIGHT_RECORDS = ("inception_weights", "inception_weights_sha256", "inception_sha256")
CACHE_FOLDER, CACHE_FORMAT = "reference_features", 1  # under weights.fetch.cache_dir()


class BadBatch(ValueError):
    """A sample or reference file that cannot be evaluated; the message says why and what to do."""


class NpzImages:
    """``arr_0`` of an ``.npz`` read in row chunks straight from the zip member (stored or deflated)."""

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = path, key
        # A local file or a gs:// object (epath opens the latter as a context only), open while this lives.
        self._file = contextlib.ExitStack()
        try:
            self._zip = zipfile.ZipFile(self._file.enter_context(storage.path(path).open("rb")))
        except (zipfile.BadZipFile, OSError) as err:
            self._file.close()
            raise BadBatch(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from err
        names = set(self._zip.namelist())
        if f"{key}.npy" not in names:
            raise BadBatch(f"{path} has no {key!r} array (it holds {sorted(n[:-4] for n in names)}); "
                           "ADM batches store the images as arr_0: np.savez(path, arr_0=uint8 [N, H, W, 3])")
        with self._zip.open(f"{key}.npy") as f:
            self.shape, self.dtype, self._offset = _npy_header(f, path)
        if len(self.shape) != 4 or self.shape[-1] != 3:
            raise BadBatch(f"{path}: {key} has shape {self.shape}; expected images [N, H, W, 3] (NHWC RGB)")
        if self.dtype != np.uint8:
            raise BadBatch(f"{path}: {key} is {self.dtype}, not uint8; ADM batches are uint8 in [0, 255] "
                           "(DiT's sample_ddp.py writes clamp(127.5 * x + 128, 0, 255).to(uint8))")

    def __len__(self) -> int:
        return self.shape[0]

    def chunks(self, start: int, stop: int, size: int) -> Iterator[np.ndarray]:
        """Rows ``start..stop-1`` in chunks of ``size``."""
        row = int(np.prod(self.shape[1:]))
        with self._zip.open(f"{self.key}.npy") as f:
            f.seek(self._offset + start * row)
            for begin in range(start, stop, size):
                count = min(size, stop - begin)
                try:
                    data = f.read(count * row)
                except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:  # a CRC or deflate error
                    raise BadBatch(f"{self.path}: {self.key} is damaged (rows {begin}..{begin + count - 1}: "
                                   f"{type(err).__name__}: {err}); write the file again") from None
                if len(data) != count * row:
                    raise BadBatch(f"{self.path}: {self.key} is truncated (rows from {begin} missing)")
                yield np.frombuffer(data, np.uint8).reshape((count,) + tuple(self.shape[1:]))


def _npy_header(f, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise BadBatch(f"{path}: arr_0 is not a valid .npy array ({err})") from err
    if fortran:
        raise BadBatch(f"{path}: arr_0 is stored in Fortran order; save it with np.savez(path, arr_0=np.ascontiguousarray(x))")
    return tuple(shape), dtype, f.tell()


def read_statistics(path: str) -> dict[str, np.ndarray]:
    """The precomputed ``mu, sigma, mu_s, sigma_s`` of a reference (those it has), checked for shape and NaN."""
    try:
        with storage.path(path).open("rb") as f, np.load(f) as data:
            stats = {k: np.asarray(data[k], np.float64) for k in STAT_KEYS if k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise BadBatch(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from err
    for mu, sigma, dim in (("mu", "sigma", inception.POOL_DIM), ("mu_s", "sigma_s", inception.SPATIAL_DIM)):
        if (mu in stats) != (sigma in stats):
            raise BadBatch(f"{path} has {mu if mu in stats else sigma} without {sigma if mu in stats else mu}")
        if mu in stats and (stats[mu].shape != (dim,) or stats[sigma].shape != (dim, dim)):
            raise BadBatch(f"{path}: {mu}/{sigma} have shapes {stats[mu].shape}/{stats[sigma].shape}; ADM's are "
                           f"({dim},)/({dim}, {dim}) (statistics of another network?)")
        for key in (mu, sigma):
            if key in stats and not np.isfinite(stats[key]).all():
                raise BadBatch(f"{path}: {key} contains NaN or inf")
    return stats


# The fewest images for ADM's five figures: precision/recall's radius is the distance to the PR_K-th neighbour
# (so more than PR_K images in each set); FID/sFID need 2 for a covariance, the Inception Score more than 1.
MIN_IMAGES = metrics.PR_K + 1


def check_batch_sizes(num_samples: int, num_reference_images: int | None) -> None:
    """Refuse batches too small for the five figures (before any network is built), naming the minimum."""
    if num_samples < MIN_IMAGES:
        raise BadBatch(f"the samples hold {num_samples} images; the five figures need at least {MIN_IMAGES} "
                       f"(precision/recall: more than k={metrics.PR_K}; FID and sFID: 2; ADM uses 50,000)")
    if num_reference_images is not None and num_reference_images < MIN_IMAGES:
        raise BadBatch(f"the reference holds {num_reference_images} images (arr_0); the five figures need at least "
                       f"{MIN_IMAGES} (precision/recall: more than k={metrics.PR_K}; ADM's references hold 10,000)")


def read_weight_record(path: str) -> dict[str, str]:
    """What a reference records about the Inception weights of its statistics (``WEIGHT_RECORDS`` found in the
    ``metadata`` that ``dit_jax.reference_batch`` writes); {} for ADM's batches, which record none."""
    try:
        with storage.path(path).open("rb") as f, np.load(f) as data:
            if "metadata" not in data.files:
                return {}
            settings = json.loads(str(data["metadata"])).get("settings", {})
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, AttributeError) as err:
        raise BadBatch(f"{path}: its metadata cannot be read ({type(err).__name__}: {err})") from err
    return {k: str(settings[k]) for k in WEIGHT_RECORDS if k in settings}


class Reference(NamedTuple):
    """A reference batch: its precomputed statistics (those it has), its images (None without ``arr_0``) and
    what it records about the weights of its statistics (``read_weight_record``)."""

    statistics: dict[str, np.ndarray]
    images: NpzImages | None
    weights: dict[str, str]


def open_reference(path: str) -> Reference:
    """Check a reference batch up front (readable, statistics valid, images uint8 NHWC); one of them must be there."""
    stats = read_statistics(path)
    try:
        images: NpzImages | None = NpzImages(path)
    except BadBatch as err:
        if "no 'arr_0'" not in str(err):
            raise
        images = None
    if images is None and not stats:
        raise BadBatch(f"{path} has neither images (arr_0) nor statistics ({', '.join(STAT_KEYS)}); pass ADM's "
                       "VIRTUAL_imagenet256_labeled.npz or a batch built by python -m dit_jax.reference_batch")
    return Reference(stats, images, read_weight_record(path) if stats else {})


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
    import jax
    from jax.experimental import multihost_utils

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
    import jax

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
    import jax
    import tqdm

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


def evaluate(reference: str, samples: str, *, inception_weights: str | None = None, batch_size: int | None = None,
             pr_float16: bool = True, split_size: int = metrics.SPLIT_SIZE, progress: bool = True,
             cache: bool = True) -> dict[str, Any]:
    """ADM's five figures for ``samples`` against ``reference``, with every setting and note (a JSON-able dict).

    ``inception_weights``: a file, a registry name or ``random:SEED`` (a smoke test). A reference whose
    statistics record other weights is refused before any image is read. ``cache``: reuse (or keep) what the
    reference's images give with these weights (``feature_cache_path``).
    """
    import jax

    started = time.time()
    samples, reference = storage.absolute(samples), fetch.locate(reference, REFERENCE_NAMES)
    sample_images = NpzImages(samples)
    ref = open_reference(reference)
    ref_stats, ref_images, _ = ref
    check_batch_sizes(len(sample_images), None if ref_images is None else len(ref_images))
    notes = []
    if ref_images is not None and ref_images.shape[1:3] != sample_images.shape[1:3]:
        notes.append(f"samples are {sample_images.shape[1]}x{sample_images.shape[2]}, the reference images "
                     f"{ref_images.shape[1]}x{ref_images.shape[2]}: allowed (both are resized to 299x299, as ADM "
                     "does), but the figures compare different resolutions")
    weights = read_weights(inception_weights)
    notes += check_reference_weights(ref, reference, weights)
    smoke_test = inception.random_seed(weights.source) is not None
    if smoke_test:
        notes.insert(0, f"random Inception weights ({weights.source}): a smoke test of the pipeline; these figures "
                        "are comparable with nothing (not with published ones, nor with any run of real weights)")
    cache_path = feature_cache_path(reference, weights.sha256) if cache and ref_images is not None else None
    cached = cache_path is not None and cache_path.exists()
    model = inception.create_inception(weights.tensors)
    features = inception.create_feature_fn(model, batch_size=batch_size)
    chunk = 256
    sample_feats = batch_features(sample_images, features, chunk=chunk, progress=progress, label="samples")
    if not np.isfinite(sample_feats["pool"]).all():
        raise BadBatch("the Inception features of the samples are not finite (NaN/inf): check the weights file")
    reference_feats = reference_features(ref, features, chunk=chunk, progress=progress, cache=cache_path)
    figures, metric_notes = metrics.compute_metrics(sample_feats, reference_feats, split_size=split_size,
                                                    pr_float16=pr_float16)
    return {
        **figures,
        "num_samples": len(sample_images),
        "num_reference_images": 0 if ref_images is None else len(ref_images),
        "notes": notes + metric_notes,
        "settings": {
            "samples": samples, "reference": reference,
            "sample_shape": list(sample_images.shape),
            "reference_statistics": "precomputed mu/sigma/mu_s/sigma_s" if ref_stats else "from arr_0",
            "inception_weights": weights.source, "inception_weights_sha256": weights.sha256,
            "smoke_test_random_weights": smoke_test,
            "reference_features": ("none (no arr_0)" if cache_path is None and ref_images is None else
                                   "computed (cache off)" if cache_path is None else
                                   f"{'read from' if cached else 'computed, kept in'} {cache_path}"),
            "resize": "TF1 ResizeBilinear to 299x299, no half-pixel centres", "normalisation": "(x - 128) / 128",
            "precision": "float32, precision=HIGHEST", "fd_sqrt": "scipy.linalg.sqrtm, float64",
            "is_split_size": split_size, "pr_k": metrics.PR_K, "pr_block": metrics.PR_BLOCK,
            "pr_distances": "float16" if pr_float16 else "float32", "batch_size": batch_size,
            "devices": jax.device_count(), "processes": jax.process_count(), "platform": jax.devices()[0].platform,
        },
        "seconds": round(time.time() - started, 1),
    }


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("reference", None, "reference batch .npz: a path, one built by python -m "
                        f"dit_jax.reference_batch, or ADM's by name ({', '.join(REFERENCE_NAMES)}; fetched into the "
                        "cache)", required=True)
    flags.DEFINE_string("samples", None, "sample batch .npz: arr_0 uint8 [N, H, W, 3]", required=True)
    flags.DEFINE_string("inception_weights", None, "the FID InceptionV3 weights: pytorch-fid's or torch-fidelity's "
                        f".pth, a .safetensors conversion, or a registry name (default {inception.DEFAULT_WEIGHTS}, "
                        "fetched into the cache); random:SEED = random weights, a smoke test whose figures are "
                        "comparable with nothing")
    flags.DEFINE_bool("reference_cache", True, "reuse what the reference's images give with these weights, kept "
                      f"in $DIT_JAX_CACHE/{CACHE_FOLDER}/ (keyed by the file's content and the weights' SHA-256)")
    flags.DEFINE_string("json", None, "also write the figures, settings and notes to this JSON file")
    flags.DEFINE_integer("batch_size", None, "global Inception batch (default 32 per device)")
    flags.DEFINE_bool("pr_float32", False, "precision/recall distances in float32 instead of ADM's float16")
    flags.DEFINE_string("save_safetensors", None, "convert --inception_weights to this .safetensors file and exit")
    compilation_cache.define_flag()


def main(argv: list[str]) -> None:
    from absl import flags

    from dit_jax import sharding

    del argv
    f = flags.FLAGS
    compilation_cache.enable(f.compilation_cache)
    sharding.initialize_distributed()
    try:
        if f.save_safetensors:
            print(f"wrote {inception.save_safetensors(f.inception_weights, f.save_safetensors)}")
            return
        result = evaluate(f.reference, f.samples, inception_weights=f.inception_weights, batch_size=f.batch_size,
                          pr_float16=not f.pr_float32, cache=f.reference_cache)
    except (BadBatch, ValueError, FileNotFoundError, fetch.DownloadError) as err:
        sys.exit(f"error: {err}")
    if not sharding.is_main_process():
        return
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"{result['num_samples']} samples")
    for key, name in FIGURES:
        print(f"{name}: {result[key]:.6g}" if key in result else f"{name}: not computed")
    if f.json:
        storage.write_atomic(storage.absolute(f.json), json.dumps(result, indent=2))


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
