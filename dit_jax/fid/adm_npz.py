"""ADM's ``.npz`` batches: reading references and samples (checked, streamed), writing samples.

``arr_0`` is uint8 ``[N, H, W, 3]`` (NHWC RGB), ``arr_1`` the labels; a reference may also hold
the precomputed ``mu, sigma, mu_s, sigma_s`` and (``dit_jax.reference_batch``'s) ``metadata``.
Images are read in row chunks straight from the zip member, so a 50K-image file is never loaded
whole; a file that cannot be evaluated raises ``BadBatch`` saying why and what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from dit_jax import storage
from dit_jax.fid import inception, metrics
from dit_jax.weights import fetch

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# Reference batches a user may name instead of a path (fetched into the cache): ADM's.
REFERENCE_NAMES = tuple(name for name in fetch.REGISTRY if name.endswith(".npz"))
# What a reference batch records about the weights of its statistics (dit_jax.reference_batch's metadata):
# the name, the SHA-256 of the tensors (inception.weights_sha256) and, for files, of the file.
WEIGHT_RECORDS = ("inception_weights", "inception_weights_sha256", "inception_sha256")


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


def write_adm_npz(path: str, images: Iterable[np.ndarray], image_shape: tuple[int, ...], labels: np.ndarray,
                  arrays: dict[str, np.ndarray] | None = None) -> None:
    """ADM's format (``np.savez(path, arr_0=images, arr_1=labels, **arrays)``), ``arr_0`` streamed from
    ``images`` (uint8 chunks ``[n, *image_shape]``, in order, ``len(labels)`` rows in all), written atomically
    (for a bucket: streamed into a local temporary file, then uploaded as one object)."""
    tmp = tempfile.mkstemp(suffix=".npz", prefix="dit_jax_samples_")[1] if storage.is_bucket(path) else path + ".tmp"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(labels), *image_shape)}
    rows = 0
    with open(tmp, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for chunk in images:
                    f.write(np.ascontiguousarray(chunk, np.uint8).tobytes())
                    rows += len(chunk)
            with archive.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, np.int64))
            for key, value in (arrays or {}).items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
    if rows != len(labels):
        os.remove(tmp)
        raise ValueError(f"{path}: {rows} images for {len(labels)} labels; nothing was written")
    storage.publish(tmp, path)
