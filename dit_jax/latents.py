"""Pre-encoded VAE latents on disk: the shard format, its metadata, and a grain source over it.

A latents folder holds ``shard-XXXXX-of-YYYYY.array_record`` files, one ``.json`` report
next to each (written last: a shard without it is unfinished), ``plan.json`` (what the
extraction was asked to do) and, once every shard is done, ``metadata.json``.

Each record is one image: its int32 label, then the VAE posterior's mean and std for the
image and its horizontal flip, ``[2, h, w, c]`` each, in the storage dtype (float16 or
bfloat16). Training draws ``scale * (mean + std * noise)`` for a random one of the two views
every time it reads the record, as the paper's on-the-fly encoding did.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import ml_dtypes
import numpy as np

STORAGE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
METADATA = "metadata.json"
PLAN = "plan.json"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


def record_dtype(shape: tuple[int, int, int], dtype: str) -> np.dtype:
    """The packed layout of one record: int32 label, then mean and std ``[2, h, w, c]`` (original, flipped)."""
    view = (2, *shape)
    return np.dtype([("label", "<i4"), ("mean", STORAGE_DTYPES[dtype], view), ("std", STORAGE_DTYPES[dtype], view)])


def encode_record(label: int, mean: np.ndarray, std: np.ndarray, dtype: str) -> bytes:
    """One record's bytes; ``mean``/``std`` are ``[2, h, w, c]`` (the image, its flip)."""
    record = np.zeros((), record_dtype(mean.shape[1:], dtype))
    record["label"], record["mean"], record["std"] = label, mean, std
    return record.tobytes()


def decode_records(data: list[bytes], shape: tuple[int, int, int], dtype: str) -> np.ndarray:
    """Records -> a structured array [N] with fields label, mean, std (the inverse of ``encode_record``)."""
    layout = record_dtype(shape, dtype)
    bad = [len(d) for d in data if len(d) != layout.itemsize]
    if bad:
        raise ValueError(f"corrupt latent record: {bad[0]} bytes, expected {layout.itemsize} for {shape} {dtype} "
                         "mean and std; the shards do not match metadata.json, extract again")
    return np.frombuffer(b"".join(data), layout)


def read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path: str, value: dict[str, Any]) -> None:
    """Write to a temporary name, then rename: readers see the old file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metadata(latents_dir: str) -> dict[str, Any]:
    """The finished folder's metadata; clear errors for a missing or unfinished extraction."""
    if not latents_dir:
        raise ValueError("data.latents_dir is empty: pre-encode the images with `python -m dit_jax.extract_latents "
                         "--images=DIR --vae=VAE --resolution=256 --out=LATENTS_DIR`, then pass "
                         "--config.data.latents_dir=LATENTS_DIR")
    path = os.path.join(latents_dir, METADATA)
    if not os.path.exists(path):
        unfinished = os.path.exists(os.path.join(latents_dir, PLAN))
        raise FileNotFoundError(
            f"{path} does not exist: " + ("the extraction into this folder has not finished; run the same "
                                          "`python -m dit_jax.extract_latents` command again to complete it"
                                          if unfinished else
                                          "not a latents folder written by `python -m dit_jax.extract_latents`"))
    return read_json(path)


class LatentSource:
    """A grain random-access source over a finished latents folder (records in shard order)."""

    def __init__(self, latents_dir: str, *, random_flip: bool = True):
        self.random_flip = random_flip
        self.metadata = read_metadata(latents_dir)
        self.shape = tuple(self.metadata["latent_shape"])
        self.dtype = self.metadata["dtype"]
        self.scale_factor = float(self.metadata["scale_factor"])
        self.num_classes = len(self.metadata["counts_per_class"])
        paths = [os.path.join(latents_dir, s["file"]) for s in self.metadata["shards"] if s["num_records"]]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in {METADATA} are missing, e.g. {missing[0]}; "
                                    "restore them or extract again into an empty folder")
        self._records = grain.sources.ArrayRecordDataSource(paths)
        if len(self._records) != self.metadata["num_images"]:
            raise ValueError(f"{latents_dir}: the shards hold {len(self._records)} records but {METADATA} "
                             f"counts {self.metadata['num_images']}; the folder is damaged, extract again")

    def __len__(self) -> int:
        return len(self._records)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Records ``indices`` as a structured array (fields label, mean, std), read in parallel."""
        return decode_records(self._records.__getitems__([int(i) for i in indices]), self.shape, self.dtype)

    def sample_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Record indices [B] -> {"image": float32 [B, h, w, c] scaled latent samples, "label": int32 [B]}.

        Each example takes the original or (if ``random_flip``) the flipped view with probability
        1/2 and a fresh posterior sample ``mean + std * N(0, 1)``, times the VAE scale factor.
        """
        records = self.read(indices)
        b = len(records)
        view = rng.integers(0, 2, b) if self.random_flip else np.zeros(b, np.int64)
        rows = np.arange(b)
        mean = records["mean"][rows, view].astype(np.float32)
        std = records["std"][rows, view].astype(np.float32)
        # SFC64 draws normals faster than grain's per-batch Philox; seeded from it, so still deterministic.
        noise = np.random.Generator(np.random.SFC64(rng.integers(2**63))).standard_normal(mean.shape, np.float32)
        image = (mean + std * noise) * np.float32(self.scale_factor)
        return {"image": image, "label": records["label"].astype(np.int32)}
