"""The resumable samples folder of FID mode: finished blocks, ``settings.json``, then ADM's ``samples.npz``.

``write_samples`` runs the engine block by block into ``out/blocks/`` (each block written
atomically), checks a rerun's settings against ``settings.json``, sets damaged blocks aside and
makes only what is missing, then streams the blocks into ``samples.npz`` (``fid.adm_npz``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from dit_jax import locking, sharding, storage
from dit_jax.fid import adm_npz
from dit_jax.sampling import engine

SAMPLES_NPZ, SETTINGS_JSON, BLOCKS_DIR = "samples.npz", "settings.json", "blocks"


def software_versions() -> dict[str, str]:
    """Versions of what computed the samples (recorded beside them)."""
    versions = {"python": sys.version.split()[0]}
    for package in ("jax", "jaxlib", "flax", "numpy", "dit_jax"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def weights_digest(*modules: nnx.Module | None) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the modules' parameters (which weights made the samples)."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for path, var in sorted(nnx.to_flat_state(nnx.state(module)), key=lambda item: str(item[0])):
            value = np.asarray(var[...])
            digest.update(f"{path}{value.shape}{value.dtype}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def block_name(start: int, stop: int) -> str:
    return f"{start:08d}-{stop:08d}.npz"


_BLOCK_RE = re.compile(r"^(\d{8})-(\d{8})\.npz$")


def block_range(name: str) -> tuple[int, int] | None:
    """The samples ``(start, stop)`` a block file's name (``block_name``) covers; None for another name."""
    match = _BLOCK_RE.match(name)
    return (int(match[1]), int(match[2])) if match else None


def finished_prefix(blocks_dir: str) -> tuple[int, list[tuple[int, int]]]:
    """How many samples the finished block files cover from index 0, and those blocks (start, stop)."""
    ranges = sorted(filter(None, (block_range(p.name) for p in storage.path(blocks_dir).iterdir())))
    end, used = 0, []
    for start, stop in ranges:
        if start == end:
            used.append((start, stop))
            end = stop
    return end, used


def write_block(blocks_dir: str, block: engine.Block) -> None:
    """Write a block atomically (``storage.write_atomic``): a killed run never leaves a partial block."""
    stop = block.start + len(block.labels)
    encoded = io.BytesIO()
    np.savez(encoded, images=block.images, labels=block.labels)
    storage.write_atomic(storage.path(blocks_dir) / block_name(block.start, stop), encoded.getvalue())


def block_problem(path: Any, count: int, image_shape: tuple[int, ...]) -> str | None:
    """What is wrong with a block file (``write_block``) of ``count`` images, found without reading its data: a
    truncated file (no zip directory, or less data on disk than the directory records) or other images."""
    try:
        with path.open("rb") as raw, zipfile.ZipFile(raw) as archive:
            info = archive.getinfo("images.npy")
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            if path.stat().length < info.header_offset + info.compress_size:
                return "truncated"
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as err:
        return f"cannot be read ({type(err).__name__}: {err})"
    if tuple(shape) != (count, *image_shape) or dtype != np.uint8:
        return f"holds {dtype} {tuple(shape)}, expected uint8 {(count, *image_shape)}"
    return None


def set_aside_damaged_blocks(blocks_dir: str, image_shape: tuple[int, ...]) -> list[str]:
    """Rename each damaged block file (``block_problem``) to ``<name>.damaged[-N]``, so its samples are made
    again; returns the names set aside. Checked at the start of a run, not after all its work."""
    damaged = []
    for block in storage.path(blocks_dir).iterdir():
        covered = block_range(block.name)
        problem = covered and block_problem(block, covered[1] - covered[0], image_shape)
        if problem:
            aside, n = block.with_name(block.name + ".damaged"), 1
            while aside.exists():
                n += 1
                aside = block.with_name(f"{block.name}.damaged-{n}")
            block.rename(aside)
            logging.warning("block file %s %s: set aside as %s; its samples are made again", block, problem,
                            aside.name)
            damaged.append(block.name)
    return damaged


def missing_ranges(blocks_dir: str, n: int) -> list[tuple[int, int]]:
    """The sample ranges ``[a, b)`` of ``0..n-1`` that no chain of block files from 0 covers."""
    ranges = sorted(filter(None, (block_range(p.name) for p in storage.path(blocks_dir).iterdir())))
    gaps, end = [], 0
    for start, stop in ranges:
        if start > end:
            gaps.append((end, start))
        if start >= end:
            end = stop
    return gaps + ([(end, n)] if end < n else [])


def read_blocks(blocks_dir: str, blocks: list[tuple[int, int]], image_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The images of the block files ``blocks`` (``write_block``) in order, each checked (``adm_npz.write_adm_npz``
    streams them into ``arr_0``)."""
    for start, stop in blocks:
        name = storage.path(blocks_dir) / block_name(start, stop)
        try:
            with np.load(io.BytesIO(name.read_bytes())) as block:
                images = block["images"]
        except Exception as err:
            raise OSError(f"block file {name} cannot be read ({type(err).__name__}: {err}); delete it "
                          "and rerun the same command to sample those images again") from err
        if images.shape != (stop - start, *image_shape) or images.dtype != np.uint8:
            raise OSError(f"block file {name} holds {images.dtype} {images.shape}, expected uint8 "
                          f"{(stop - start, *image_shape)}; delete it and rerun the same command")
        yield images


def _prepare_out_dir(out_dir: str, record: dict[str, Any],
                     image_shape: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """Process 0: check (or write) ``settings.json``, set damaged blocks aside and return the sample ranges
    still to make (None: already complete)."""
    out = storage.path(out_dir)
    path = out / SETTINGS_JSON
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} cannot be read ({err}); choose another --out folder") from err
        changed = storage.json_differences(old.get("settings", {}), record["settings"])
        if changed:
            raise ValueError(f"{out_dir} holds samples made with other settings ({'; '.join(changed)}); rerun with "
                             "the old settings to resume, or choose another --out folder")
    elif ((out / BLOCKS_DIR).exists() and any((out / BLOCKS_DIR).iterdir())) or (out / SAMPLES_NPZ).exists():
        raise FileExistsError(f"{out_dir} holds samples but no {SETTINGS_JSON}: choose an empty --out folder")
    else:
        storage.write_json_atomic(path, record)
    (out / BLOCKS_DIR).mkdir(parents=True, exist_ok=True)  # only once the folder is this run's
    if (out / SAMPLES_NPZ).exists():
        return None
    for block in (out / BLOCKS_DIR).iterdir():
        if block.name.endswith(".tmp"):  # a block a killed run was writing
            block.unlink()
    set_aside_damaged_blocks(os.fspath(out / BLOCKS_DIR), image_shape)
    return missing_ranges(os.fspath(out / BLOCKS_DIR), record["settings"]["num_samples"])


def write_samples(out_dir: str, image_sampler: engine.ImageSampler, labels: np.ndarray, *, seed: int,
                  settings: dict[str, Any] | None = None, progress: bool = True) -> str:
    """Sample ``labels`` into ``out_dir/samples.npz`` (ADM format), resuming what a killed run left.

    ``out_dir`` is locked for the run (``locking.hold``: a second command on it refuses, naming the
    first). Finished blocks go to ``out_dir/blocks/`` (atomically); ``settings.json`` records every
    setting (``settings`` + the engine's + seed, N, a digest of the labels) and the software;
    a rerun with other settings is refused naming them. At the end the blocks are streamed
    into ``samples.npz`` (``arr_0`` uint8 [N, H, W, 3], ``arr_1`` labels), then deleted. Only
    process 0 writes; every process computes. Returns the path of ``samples.npz``.
    """
    with locking.hold(out_dir, purpose="sampling"):
        return _write_samples_locked(out_dir, image_sampler, labels, seed=seed, settings=settings, progress=progress)


def _write_samples_locked(out_dir: str, image_sampler: engine.ImageSampler, labels: np.ndarray, *, seed: int,
                          settings: dict[str, Any] | None, progress: bool) -> str:
    """``write_samples`` holding the lock of ``out_dir``."""
    import tqdm  # only the command's progress bar needs it

    labels = np.asarray(labels, np.int32)
    record = {"settings": {**(settings or {}), **image_sampler.settings, "seed": int(seed),
                           "num_samples": len(labels),
                           "labels_sha256": hashlib.sha256(labels.astype("<i4").tobytes()).hexdigest()},
              "software": software_versions(),
              "devices": {"count": jax.device_count(), "kind": jax.devices()[0].device_kind,
                          "processes": jax.process_count(), "block_size": image_sampler.block_size}}
    record = json.loads(json.dumps(record))  # as stored: tuples -> lists
    main = sharding.is_main_process()
    gaps, status, error = [], 0, None
    if main:
        try:
            gaps = _prepare_out_dir(out_dir, record, image_sampler.image_shape)
            status = -1 if gaps is None else len(gaps)
        except (ValueError, OSError) as err:
            status, error = -2, err
    if jax.process_count() > 1:  # every process learns what to make, or that process 0 refused
        status = int(multihost_utils.broadcast_one_to_all(np.int64(status)))
        if status > 0:
            gaps = multihost_utils.broadcast_one_to_all(np.asarray(gaps if main else np.zeros((status, 2)), np.int64))
    if status == -2:
        raise error if error is not None else ValueError(f"process 0 refused {out_dir}: see its log")
    npz = os.fspath(storage.path(out_dir) / SAMPLES_NPZ)
    if status == -1:
        logging.info("%s is complete; nothing to do", npz)
        return npz
    gaps = [(int(a), int(b)) for a, b in gaps]
    done = len(labels) - sum(b - a for a, b in gaps)
    if done:
        logging.info("resuming %s: %d of %d samples are made; making %s", out_dir, done, len(labels),
                     ", ".join(f"{a}..{b - 1}" for a, b in gaps))
    blocks_dir = os.fspath(storage.path(out_dir) / BLOCKS_DIR)
    t0 = time.time()
    with tqdm.tqdm(total=len(labels), initial=done, unit="img", desc="sampling", file=sys.stderr,
                   disable=not (main and progress), smoothing=0.1) as bar:
        for first, stop in gaps:  # only what is missing: a damaged block set aside is made again alone
            for block in engine.iterate_blocks(image_sampler, labels[:stop], seed=seed, start=first):
                if main:
                    write_block(blocks_dir, block)
                bar.update(len(block.labels))
    if main:
        end, blocks = finished_prefix(blocks_dir)
        if end != len(labels):
            raise RuntimeError(f"{blocks_dir} covers samples 0..{end - 1} of {len(labels)} after the run")
        adm_npz.write_adm_npz(npz, read_blocks(blocks_dir, blocks, image_sampler.image_shape),
                              image_sampler.image_shape, labels)
        record["run"] = {"seconds_this_run": time.time() - t0, "resumed_at": gaps[0][0] if gaps else len(labels),
                         "made_this_run": gaps}
        storage.write_json_atomic(storage.path(out_dir) / SETTINGS_JSON, record)
        for first, stop in blocks:
            (storage.path(blocks_dir) / block_name(first, stop)).unlink()
    sharding.sync_processes("dit_jax.sample: samples.npz written")
    return npz
