"""Pre-encoded VAE latents on disk: the shard format, its metadata, and a grain source over it.

A latents folder holds ``shard-XXXXX-of-YYYYY.array_record`` files, one ``.json`` report
next to each (written last: a shard without it is unfinished; it records the shard's size
and SHA-256), ``plan.json`` (what the extraction was asked to do, the VAE weights' hash and
the encoding batch and devices included) and, once every shard is done, ``metadata.json``.
Opening a folder checks every shard's size (``verify=True``: its SHA-256 too) and names any
damaged shard with the command that re-encodes it.

Each record is one image: its int32 label, then the VAE posterior's mean and std for the
image and its horizontal flip, ``[2, h, w, c]`` each, in the storage dtype (float16 or
bfloat16). Training draws ``scale * (mean + std * noise)`` for a random one of the two views
every time it reads the record, as the paper's on-the-fly encoding did.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import grain
import ml_dtypes
import numpy as np

from dit_jax import storage

STORAGE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
METADATA = "metadata.json"
PLAN = "plan.json"
# One record per group: training reads single records in random order.
WRITER_OPTIONS = "group_size:1,uncompressed"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


def report_name(index: int, count: int) -> str:
    """The name of a shard's ``.json`` report (written once the shard is complete)."""
    return shard_name(index, count)[:-len(".array_record")] + ".json"


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


def shard_problems(latents_dir: str, shards: list[dict[str, Any]], *, verify: bool) -> dict[str, str]:
    """``{file: what is wrong}`` for shards (entries with ``file``, ``bytes``, ``sha256``) that are
    missing, of another size, or (``verify``) of other contents than when they were written."""
    problems = {}
    for shard in shards:
        path = storage.path(latents_dir) / shard["file"]
        if not path.exists():
            problems[shard["file"]] = "missing"
        elif "bytes" in shard and path.stat().length != shard["bytes"]:
            problems[shard["file"]] = f"{path.stat().length} bytes, but {shard['bytes']} were written"
        elif verify and "sha256" not in shard:
            problems[shard["file"]] = "no checksum recorded (written by an older dit_jax): extract again"
        elif verify and storage.sha256_file(path) != shard["sha256"]:
            problems[shard["file"]] = "its SHA-256 differs from the one recorded when it was written"
    return problems


def extraction_command(plan: dict[str, Any], latents_dir: str) -> str:
    """The ``extract_latents`` command line that made (and resumes or repairs) ``latents_dir``."""
    source = plan["source"]
    if source["kind"] == "folder":
        args = [f"--images={source['root']}"]
    else:
        args = [f"--tfds_name={source['name']}", f"--tfds_split={source['split']}",
                f"--tfds_data_dir={source['data_dir']}"]
    args += [f"--vae={plan['vae']}", f"--resolution={plan['resolution']}", f"--dtype={plan['dtype']}",
             f"--images_per_shard={plan['images_per_shard']}"]
    if "encoding" in plan:
        args.append(f"--batch_size={plan['encoding']['batch_size']}")
    return shlex.join(["python", "-m", "dit_jax.extract_latents", *args, f"--out={latents_dir}"])


def read_metadata(latents_dir: str) -> dict[str, Any]:
    """The finished folder's metadata; clear errors for a missing, unfinished or empty extraction."""
    if not latents_dir:
        raise ValueError("data.latents_dir is empty: pre-encode the images with `python -m dit_jax.extract_latents "
                         "--images=DIR --vae=VAE --resolution=256 --out=LATENTS_DIR`, then pass "
                         "--config.data.latents_dir=LATENTS_DIR")
    if not storage.path(latents_dir).is_dir():
        raise FileNotFoundError(f"latents folder {latents_dir} does not exist: make it with "
                                "`python -m dit_jax.extract_latents --images=DIR --out=LATENTS_DIR`")
    path = storage.path(latents_dir) / METADATA
    plan_path = storage.path(latents_dir) / PLAN
    if not path.exists():
        if not plan_path.exists():
            raise FileNotFoundError(f"{path} does not exist: not a latents folder written by "
                                    "`python -m dit_jax.extract_latents`")
        plan = storage.read_json(plan_path)
        done = sum((storage.path(latents_dir) / report_name(i, plan["num_shards"])).exists()
                   for i in range(plan["num_shards"]))
        raise FileNotFoundError(f"{path} does not exist: the extraction into {latents_dir} has not finished "
                                f"({done} of {plan['num_shards']} shards done); run "
                                f"`{extraction_command(plan, latents_dir)}` to complete it")
    try:
        metadata = storage.read_json(path)
    except ValueError as err:
        raise ValueError(f"{err}; rerun the extraction on {latents_dir} (the same command) to write it again from "
                         "the shards' reports") from None
    if not metadata.get("num_images"):
        raise ValueError(f"{latents_dir} holds no latents: none of its {metadata.get('num_source_images', 0)} "
                         f"source images could be encoded (see 'skipped' in {path}); extract again from "
                         "readable images into an empty folder")
    return metadata


class CorruptShardError(ValueError):
    """Shards of a latents folder are missing or damaged; the message names them and the repair."""


class LatentSource:
    """A grain random-access source over a finished latents folder (records in shard order).

    Opening checks each shard's size against ``metadata.json`` (``verify``: also its SHA-256,
    reading every byte once); a damaged shard is named with the command that re-encodes it.
    """

    def __init__(self, latents_dir: str, *, random_flip: bool = True, verify: bool = False):
        self.random_flip = random_flip
        self.latents_dir = latents_dir = storage.absolute(latents_dir) if latents_dir else latents_dir  # '' is named
        self.metadata = read_metadata(latents_dir)
        self.shape = tuple(self.metadata["latent_shape"])
        self.dtype = self.metadata["dtype"]
        self.scale_factor = float(self.metadata["scale_factor"])
        self.num_classes = len(self.metadata["counts_per_class"])
        shards = [s for s in self.metadata["shards"] if s["num_records"]]
        problems = shard_problems(latents_dir, shards, verify=verify)
        if problems:
            raise self._corrupt(problems)
        self._files = [s["file"] for s in shards]
        self._ends = np.cumsum([s["num_records"] for s in shards])  # record index -> shard
        try:
            self._records = grain.sources.ArrayRecordDataSource([self._shard_path(f) for f in self._files])
        except Exception as err:  # a damaged index (the file's last block) fails at open
            failing = self._unopenable()
            if not failing:
                raise
            raise self._corrupt(failing) from err
        if len(self._records) != self.metadata["num_images"]:
            raise ValueError(f"{latents_dir}: the shards hold {len(self._records)} records but {METADATA} "
                             f"counts {self.metadata['num_images']}; the folder is damaged, extract again")

    def _corrupt(self, problems: dict[str, str]) -> CorruptShardError:
        listed = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items()))
        try:
            command = f"`{extraction_command(self.metadata, self.latents_dir)} --verify` (the command that made it)"
        except KeyError:  # metadata without the plan's fields (not written by extract_latents)
            command = "the `python -m dit_jax.extract_latents` command that made the folder with --verify"
        return CorruptShardError(
            f"{self.latents_dir}: {len(problems)} damaged shard(s): {listed}. Repair: run {command}: "
            "it checks every shard and re-encodes only the damaged ones")

    def _shard_path(self, name: str) -> str:
        """A shard's path for array_record, which reads local files and ``gs://`` objects itself."""
        return os.fspath(storage.path(self.latents_dir) / name)

    def __len__(self) -> int:
        return len(self._records)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Records ``indices`` as a structured array (fields label, mean, std), read in parallel."""
        indices = [int(i) for i in indices]
        try:
            return decode_records(self._records.__getitems__(indices), self.shape, self.dtype)
        except Exception as err:  # a damaged shard fails in the reader or decodes to a wrong size
            failing = self._failing_shards(indices)
            if not failing:
                raise
            raise self._corrupt(failing) from err

    def _unopenable(self) -> dict[str, str]:
        """The shards that fail to open, and how."""
        failing = {}
        for name in self._files:
            try:
                grain.sources.ArrayRecordDataSource([self._shard_path(name)])
            except Exception as err:
                failing[name] = f"opening it failed ({type(err).__name__}: {str(err)[:200]})"
        return failing

    def _failing_shards(self, indices: list[int]) -> dict[str, str]:
        """Read ``indices`` shard by shard to find which shards fail, and how."""
        by_shard: dict[str, list[int]] = {}
        for index, shard in zip(indices, np.searchsorted(self._ends, indices, side="right")):
            by_shard.setdefault(self._files[shard], []).append(index)
        failing = {}
        for name, group in by_shard.items():
            try:
                decode_records([self._records[i] for i in group], self.shape, self.dtype)
            except Exception as err:
                failing[name] = f"reading it failed ({type(err).__name__}: {str(err)[:200]})"
        return failing

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
