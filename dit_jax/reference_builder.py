"""An ADM reference batch from an image source, streamed and resumable (``python -m dit_jax.reference_batch``).

The file is what ADM's ``VIRTUAL_imagenet256_labeled.npz`` is, for any images: ``mu, sigma``
(pool_3, 2048) and ``mu_s, sigma_s`` (the sFID features, 2023) over every image, and ``arr_0``,
a fixed random subset of ``keep_images`` of them as uint8 ``[N, S, S, 3]`` (``arr_1``: their
labels; ``metadata``: JSON of the settings, the image count and every skipped file). Images get
ADM's centre crop (``dit_jax.images``) and go through the FID InceptionV3 (``dit_jax.fid``).

Only the float64 running sums (``metrics.RunningMoments``, about 64 MB) and two batches of crops
(one being decoded) are in memory; the kept images go to block files (``sampling.blocks``' format)
in ``OUT.partial/``, where the sums and the position are also saved atomically every
``save_every`` batches, so a killed run resumes where it was; a resumed run with other settings is
refused, naming them. Bad images are skipped and named (never fatal).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from dit_jax import images, locking, sharding, storage
from dit_jax.fid import adm_npz, inception, metrics
from dit_jax.sampling import blocks as sample_blocks, engine

KEEP_IMAGES = 10_000  # ADM's reference batches hold 10,000 images for precision/recall
STATE, SETTINGS, BLOCKS = "state.npz", "settings.json", "blocks"
_FEATURES = (("pool", "mu", "sigma"), ("spatial", "mu_s", "sigma_s"))


def kept_indices(num_images: int, keep: int, seed: int) -> np.ndarray:
    """The source indices whose crops go into ``arr_0``: a seeded random subset (all if ``keep >= num_images``),
    in source order (so a class-ordered folder still gives every class its share)."""
    if keep >= num_images:
        return np.arange(num_images)
    return np.sort(np.random.default_rng(seed).choice(num_images, size=keep, replace=False))


def check_settings(*, image_size: int, keep_images: int, batch_size: int, save_every: int,
                   workers: int | None = None) -> None:
    """One ValueError naming every out-of-range setting."""
    problems = [f"{name} must be >= {low}, got {value}" for name, value, low in
                (("image_size", image_size, 8), ("keep_images", keep_images, 0), ("batch_size", batch_size, 1),
                 ("save_every", save_every, 1), ("workers", 1 if workers is None else workers, 1)) if value < low]
    if problems:
        raise ValueError("; ".join(problems))


def _read_settings(path: str) -> dict[str, Any]:
    """The settings a finished reference batch was made with (a file this command did not write is refused)."""
    try:
        with np.load(path) as data:
            settings = json.loads(str(data["metadata"]))["settings"] if "metadata" in data.files else None
    except Exception as err:  # not an npz, truncated, bad JSON
        raise FileExistsError(f"{path} exists and cannot be read ({type(err).__name__}: {err}); choose another "
                              "--out (nothing is overwritten)") from err
    if settings is None:
        raise FileExistsError(f"{path} exists and was not written by this command (no metadata); choose another "
                              "--out (nothing is overwritten)")
    return settings


def _refuse_other_settings(old: dict[str, Any], new: dict[str, Any], what: str) -> None:
    changed = storage.json_differences(old, new)
    if changed:
        raise FileExistsError(f"{what} was made with other settings ({'; '.join(changed)}); rerun with the old "
                              "settings to resume or reuse it, or choose another --out")


def build(source: images.ImageSource, out: str, features: inception.FeatureFn, *, image_size: int = 256,
          keep_images: int = KEEP_IMAGES, seed: int = 0, batch_size: int = 256, save_every: int = 20,
          settings: dict[str, Any] | None = None, workers: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Write the reference batch of ``source`` to ``out`` (resuming ``out.partial/``); returns a summary.

    ``features`` is an Inception feature function (``inception.create_feature_fn``); ``settings``
    (e.g. the weights file) are recorded and must match to resume. Every process reads and crops
    every image and passes its share of each batch to ``features`` (which gathers all features);
    process 0 alone keeps the sums and writes files. ``save_every`` (batches between saves of the
    partial state) is not a setting: it does not change the file.
    """
    check_settings(image_size=image_size, keep_images=keep_images, batch_size=batch_size, save_every=save_every,
                   workers=workers)
    out = storage.absolute(out)  # as typed (relative, ~), resolved once
    record = {"source": source.describe(), "image_size": image_size, "crop": "ADM centre crop (dit_jax.images)",
              "keep_images": keep_images, "seed": seed, "batch_size": batch_size, "processes": jax.process_count(),
              **(settings or {})}
    record = json.loads(json.dumps(record))  # as stored: tuples -> lists
    if os.path.exists(out):
        _refuse_other_settings(_read_settings(out), record, out)
        logging.info("%s is complete; nothing to do", out)
        if sharding.is_main_process() and os.path.isdir(out + ".partial"):  # killed after writing out
            shutil.rmtree(out + ".partial")
        return {"out": out, "complete_already": True}
    partial = out + ".partial"
    if sharding.is_main_process():
        os.makedirs(os.path.join(partial, BLOCKS), exist_ok=True)
    with locking.hold(partial, purpose="reference batch"):
        return _build_locked(source, out, partial, features, record, save_every=save_every, workers=workers,
                             progress=progress)


class _Progress:
    """What process 0 has summed so far (saved atomically in ``STATE``): the moments, the position and lists."""

    def __init__(self):
        self.moments = {"pool": metrics.RunningMoments(inception.POOL_DIM),
                        "spatial": metrics.RunningMoments(inception.SPATIAL_DIM)}
        # kept_sources: the source index of each kept image, so a damaged block of them can be cropped again.
        self.meta: dict[str, Any] = {"next": 0, "skipped": [], "converted": {}, "kept_labels": [], "kept_sources": []}

    def save(self, partial: str) -> None:
        arrays = {k: v for name, m in self.moments.items() for k, v in m.state(name).items()}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(self.meta)), **arrays)
        storage.write_atomic(os.path.join(partial, STATE), buffer.getvalue())

    def restore(self, partial: str) -> None:
        path = os.path.join(partial, STATE)
        try:
            with np.load(path) as state:
                self.meta = {"kept_sources": None, **json.loads(str(state["meta"]))}  # None: saved by an older version
                for name, m in self.moments.items():
                    m.restore(state, name)
        except Exception as err:
            raise OSError(f"{path} (the saved progress) cannot be read ({type(err).__name__}: {err}); delete "
                          f"{partial} to start again") from err


def _resume(partial: str, record: dict[str, Any], progress: _Progress, source: images.ImageSource) -> None:
    """Process 0: check (or write) the settings; load the saved progress, drop block files it does not cover,
    set damaged ones aside and crop their images again (before any other work)."""
    path, blocks_dir = os.path.join(partial, SETTINGS), os.path.join(partial, BLOCKS)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(partial, STATE)) or os.listdir(blocks_dir):
            raise FileExistsError(f"{partial} holds progress but no {SETTINGS}: delete it to start again")
        storage.write_json_atomic(path, record)
        return
    _refuse_other_settings(storage.read_json(path), record, f"the partial reference batch {partial}")
    if os.path.exists(os.path.join(partial, STATE)):
        progress.restore(partial)
    kept, size = len(progress.meta["kept_labels"]), record["image_size"]
    for name in os.listdir(blocks_dir):  # written after the last saved state, or half-written: made again
        covered = sample_blocks.block_range(name)
        if ".damaged" not in name and (covered is None or covered[1] > kept):
            os.remove(os.path.join(blocks_dir, name))
    sample_blocks.set_aside_damaged_blocks(blocks_dir, (size, size, 3))
    for start, stop in sample_blocks.missing_ranges(blocks_dir, kept):
        _crop_kept_again(source, partial, progress.meta, start, stop, size)


def _crop_kept_again(source: images.ImageSource, partial: str, meta: dict[str, Any], start: int, stop: int,
                     size: int) -> None:
    """Kept images ``start..stop-1`` (a damaged or missing block) cropped again from their source images."""
    blocks_dir = os.path.join(partial, BLOCKS)
    if meta["kept_sources"] is None:
        raise OSError(f"{blocks_dir} lacks the kept images {start}..{stop - 1}, and progress saved by an older "
                      f"version does not say which images they are; delete {partial} to start again")
    crops = []
    for index in meta["kept_sources"][start:stop]:
        key, pixels, _, _ = images.crop_record(next(source.records(index, index + 1)), size=size)
        if isinstance(pixels, str):
            raise OSError(f"kept image {key} was read before and cannot be read now ({pixels}); restore it, or "
                          f"delete {partial} to start again")
        crops.append(pixels)
    labels = np.asarray(meta["kept_labels"][start:stop], np.int64)
    sample_blocks.write_block(blocks_dir, engine.Block(start, np.stack(crops), labels))
    logging.info("kept images %d..%d cropped again into %s", start, stop - 1, blocks_dir)


def _build_locked(source: images.ImageSource, out: str, partial: str, features: inception.FeatureFn,
                  record: dict[str, Any], *, save_every: int, workers: int | None, progress: bool) -> dict[str, Any]:
    main, n, size = sharding.is_main_process(), len(source), record["image_size"]
    state, error = _Progress(), None
    if main:
        try:
            _resume(partial, record, state, source)
        except (FileExistsError, OSError) as err:
            error = err
    start = -1 if error is not None else state.meta["next"]
    if jax.process_count() > 1:  # every process learns where to start, or that process 0 refused
        start = int(multihost_utils.broadcast_one_to_all(np.int64(start)))
    if start < 0:
        raise error if error is not None else FileExistsError(f"process 0 refused {partial}: see its log")
    if start:
        logging.info("resuming %s at image %d of %d", partial, start, n)
    keep = set(kept_indices(n, record["keep_images"], record["seed"]).tolist())
    blocks_dir, batch = os.path.join(partial, BLOCKS), record["batch_size"]
    me, count = jax.process_index(), jax.process_count()
    kept_images: list[np.ndarray] = []  # kept crops since the last save
    position, since_save = start, 0
    with (concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool,
          tqdm.tqdm(total=n, initial=start, unit="img", desc="reference batch", file=sys.stderr,
                    disable=not (main and progress), smoothing=0.05) as bar):
        for done in images.crop_batches(source.records(start, n), size=size, batch_size=batch, pool=pool):
            good = []
            for index, (key, pixels, label, mode) in enumerate(done, start=position):
                if isinstance(pixels, str):
                    logging.warning("skipping %s: %s", key, pixels)
                    state.meta["skipped"].append({"key": key, "reason": pixels})
                    continue
                good.append(pixels)
                if mode != "RGB":
                    state.meta["converted"][mode] = state.meta["converted"].get(mode, 0) + 1
                if index in keep:
                    kept_images.append(pixels)
                    state.meta["kept_labels"].append(label)
                    if state.meta["kept_sources"] is not None:
                        state.meta["kept_sources"].append(index)
            crops = np.stack(good) if good else np.zeros((0, size, size, 3), np.uint8)
            feats = features(crops[len(crops) * me // count:len(crops) * (me + 1) // count])  # all shares, in order
            if not (np.isfinite(feats["pool"]).all() and np.isfinite(feats["spatial"]).all()):
                raise FloatingPointError(f"the Inception features of images {position}..{position + len(done) - 1} "
                                         f"are not finite (NaN/inf): check the weights file; the progress up to "
                                         f"image {state.meta['next']} is saved in {partial}")
            position += len(done)
            bar.update(len(done))
            if main:
                for name, moments in state.moments.items():
                    moments.update(feats[name])
                state.meta["next"] = position
                since_save += 1
                if since_save >= save_every:
                    _save(partial, blocks_dir, state, kept_images)
                    kept_images, since_save = [], 0
    if main and since_save:  # the last batches
        _save(partial, blocks_dir, state, kept_images)
    summary: dict[str, Any] = {"out": out}
    if main:
        summary = _finish(source, out, partial, record, state)
    sharding.sync_processes("dit_jax.reference_batch: written")
    return summary


def _save(partial: str, blocks_dir: str, state: _Progress, kept_images: list[np.ndarray]) -> None:
    """The kept crops since the last save as a block file, then the state that counts them (both atomic)."""
    if kept_images:
        labels = np.asarray(state.meta["kept_labels"][-len(kept_images):], np.int64)
        start = len(state.meta["kept_labels"]) - len(kept_images)
        sample_blocks.write_block(blocks_dir, engine.Block(start, np.stack(kept_images), labels))
    state.save(partial)


def _finish(source: images.ImageSource, out: str, partial: str, record: dict[str, Any],
            state: _Progress) -> dict[str, Any]:
    """Process 0: the statistics and the kept images into ``out`` (atomically), then drop ``partial``."""
    meta, n = state.meta, len(source)
    readable = state.moments["pool"].count
    if readable < 2:
        examples = "; ".join(f"{s['key']}: {s['reason']}" for s in meta["skipped"][:3])
        raise ValueError(f"only {readable} of the {n} images could be read; statistics need at least 2 (and FID's "
                         f"2048x2048 covariance 2049 to be full rank){': ' + examples if examples else ''}")
    notes = []
    if readable <= inception.POOL_DIM:
        notes.append(f"{readable} images: the 2048x2048 covariance has rank < 2048 (FID against it needs the "
                     "square root of a singular matrix; ADM's references hold 10,000+)")
    kept = len(meta["kept_labels"])
    if kept < record["keep_images"]:
        notes.append(f"arr_0 holds {kept} images, fewer than the {record['keep_images']} asked for (the source "
                     f"has {n}, {len(meta['skipped'])} unreadable); precision/recall against it use {kept}")
    if meta["skipped"]:
        notes.append(f"{len(meta['skipped'])} unreadable images skipped (listed in the file's settings)")
    arrays: dict[str, np.ndarray] = {}
    for name, mu, sigma in _FEATURES:
        arrays[mu], arrays[sigma] = state.moments[name].statistics()
    metadata = {"settings": record, "num_images": readable, "num_kept": kept, "skipped": meta["skipped"],
               "converted": meta["converted"], "ignored": source.ignored, "notes": notes}
    arrays["metadata"] = np.array(json.dumps(metadata))
    size = record["image_size"]
    blocks_dir = os.path.join(partial, BLOCKS)
    blocks = sample_blocks.finished_prefix(blocks_dir)[1]
    adm_npz.write_adm_npz(out, sample_blocks.read_blocks(blocks_dir, blocks, (size, size, 3)), (size, size, 3),
                          np.asarray(meta["kept_labels"], np.int64), arrays)
    shutil.rmtree(partial)
    return {"out": out, "num_images": readable, "num_kept": kept, "num_skipped": len(meta["skipped"]),
            "notes": notes}
