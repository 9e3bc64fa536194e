"""Encoding an image source into a latents folder (``dit_jax.latents``' format), resumable and repairable.

Every image is ADM-centre-cropped, then it and its horizontal flip are encoded; the posterior
mean and std (not one fixed sample) are stored. The work is split by shard over hosts and each
batch over the host's local devices. A shard is written under a temporary name, renamed (for a
``gs://`` folder: written locally, then uploaded as one object), then its ``.json`` report (with
its size and SHA-256) is written: a run resumes at the first shard without a report, and a
finished folder is left as it is, except that any shard found damaged (size; ``verify``: SHA-256)
is set aside and encoded again. The plan (settings, VAE weights' hash, encoding batch and
devices) must match to resume, and the folder is locked (``dit_jax.locking``). Bad images are
skipped and listed, never fatal; a run that encodes no image at all is a RuntimeError.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import images, latents, locking, sharding, storage
from dit_jax import vae as vae_lib
from dit_jax.weights import fetch

Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@functools.partial(jax.jit, static_argnums=0)  # module level: one compilation per VAE shape, batch and devices
def _encode(graphdef: nnx.GraphDef, state: nnx.State, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = pixels.astype(jnp.float32) / 127.5 - 1.0  # ToTensor + Normalize(0.5, 0.5)
    both = jnp.stack([x, x[:, :, ::-1]], axis=1)  # [B, 2, S, S, 3]
    b = x.shape[0]
    mean, logvar = nnx.merge(graphdef, state).encode(both.reshape(2 * b, *x.shape[1:]))
    std = jnp.exp(0.5 * logvar)
    return mean.reshape(b, 2, *mean.shape[1:]), std.reshape(b, 2, *std.shape[1:])


def make_encoder(model: vae_lib.AutoencoderKL, devices: list[jax.Device]) -> Encoder:
    """uint8 images [B, S, S, 3] -> posterior (mean, std) [B, 2, h, w, c] of (image, its flip), B split over devices."""
    mesh = Mesh(np.asarray(devices), ("data",))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    data = NamedSharding(mesh, P("data"))

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = _encode(graphdef, state, jax.device_put(pixels, data))
        return np.asarray(mean), np.asarray(std)

    return run


def check_settings(*, resolution: int, images_per_shard: int, batch_size: int, workers: int | None) -> None:
    """Reject numbers that cannot make a dataset, before anything is written."""
    bad = [f"{name}={value}" for name, value in (("resolution", resolution), ("images_per_shard", images_per_shard),
                                                 ("batch_size", batch_size), ("workers", workers))
           if value is not None and (not isinstance(value, int) or value < 1)]
    if bad:
        raise ValueError(f"{', '.join(bad)}: each must be a whole number of at least 1")


def describe_vae(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """The VAE as the plan records it: its resolved name (a folder's absolute path, or the hub id)
    and its weight file's name, size and SHA-256, with the hub revision where the folder records it."""
    folder = vae_lib.resolve(name_or_path)
    weights = vae_lib.weights_file(folder)
    name = fetch.name_or_path(name_or_path)
    revision = None
    parent, leaf = os.path.split(os.path.normpath(os.path.realpath(folder)))
    hub_record = os.path.join(folder, ".cache", "huggingface", "download", os.path.basename(weights) + ".metadata")
    if os.path.basename(parent) == "snapshots":  # the Hugging Face cache: snapshots/<commit>/
        revision = leaf
    elif os.path.exists(hub_record):  # `hf download --local-dir`: the commit is the record's first line
        with open(hub_record) as f:
            revision = f.readline().strip() or None
    return name, {"file": os.path.basename(weights), "bytes": os.path.getsize(weights),
                  "sha256": storage.sha256_file(weights), "hub_revision": revision}


def make_plan(source: images.ImageSource, *, vae: str, vae_weights: dict[str, Any], vae_config: vae_lib.VAEConfig,
              resolution: int, dtype: str, images_per_shard: int, encoding: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines the output; a resumed run must have the same plan.

    ``encoding`` (batch size, devices per process, device kind, jax version) is part of it: the
    same image encoded in batches of another size or on other devices can differ in the last
    bit of float16, so one folder never mixes two encodings.
    """
    factor = vae_config.downsample_factor
    if resolution % factor:
        raise ValueError(f"resolution must be a multiple of {factor} (the VAE's downsampling), got {resolution}")
    if dtype not in latents.STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(latents.STORAGE_DTYPES)}, got {dtype!r}")
    return {
        "format": "dit_jax latents v1: int32 label, mean[2,h,w,c], std[2,h,w,c]; view 0 = image, 1 = its flip",
        "vae": vae, "vae_weights": vae_weights, "vae_config": dataclasses.asdict(vae_config),
        "scale_factor": vae_config.scaling_factor, "resolution": resolution,
        "latent_shape": [resolution // factor, resolution // factor, vae_config.latent_channels],
        "dtype": dtype, "source": source.describe(), "num_source_images": len(source),
        "images_per_shard": images_per_shard, "num_shards": -(-len(source) // images_per_shard),
        "encoding": encoding,
    }


def _check_same_plan(out_dir: str, plan: dict[str, Any], *, write: bool) -> None:
    """Start a new folder (``write``: this process writes the plan), or resume one made by the same
    command; never mix two extractions."""
    path = storage.path(out_dir) / latents.PLAN
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as stored
    if not path.exists():
        if any(f.name.startswith("shard-") for f in storage.path(out_dir).iterdir()):
            raise FileExistsError(f"{out_dir} holds shards but no {latents.PLAN}: choose an empty --out folder")
        if write:
            storage.write_json_atomic(path, plan)
        return
    old = storage.read_json(path)
    changed = storage.json_differences(old, plan)
    if changed:
        why = (" (records encoded in batches of another size or on other devices differ in the last bit, so "
               "they are not mixed)" if any(c.startswith("encoding.") for c in changed) else "")
        raise FileExistsError(
            f"{out_dir} holds another extraction; it differs in {'; '.join(changed)}{why}. To resume it, rerun "
            f"it as it was: `{latents.extraction_command(old, out_dir)}` on the same devices; or choose another "
            "--out folder")


def write_shard(source: images.ImageSource, index: int, plan: dict[str, Any], encode: Encoder, out_dir: str, *,
                batch_size: int, pool: concurrent.futures.Executor, progress: tqdm.tqdm) -> dict[str, Any]:
    """Encode shard ``index`` into its ArrayRecord file and write its report; returns the report."""
    name = latents.shard_name(index, plan["num_shards"])
    start = index * plan["images_per_shard"]
    stop = min(start + plan["images_per_shard"], plan["num_source_images"])
    report: dict[str, Any] = {"file": name, "first_image": start, "num_records": 0, "process": jax.process_index(),
                              "counts_per_class": [0] * source.num_classes, "skipped": [], "converted": {}}
    # array_record writes local files only: a shard for a bucket is written in a local temporary folder.
    scratch = tempfile.mkdtemp(prefix="dit_jax_shard_") if storage.is_bucket(out_dir) else None
    tmp = os.path.join(scratch or out_dir, name + ".tmp")
    writer = ArrayRecordWriter(tmp, latents.WRITER_OPTIONS)
    for done in images.crop_batches(source.records(start, stop), size=plan["resolution"], batch_size=batch_size,
                                    pool=pool):
        good = [d for d in done if not isinstance(d[1], str)]
        for key, reason, _, _ in done:
            if isinstance(reason, str):
                report["skipped"].append({"key": key, "reason": reason})
        if good:
            pixels = np.stack([g[1] for g in good])
            pad = -len(good) % batch_size  # a fixed batch shape: one compilation
            mean, std = encode(np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), np.uint8)]))
            for i, (key, _, label, mode) in enumerate(good):
                writer.write(latents.encode_record(label, mean[i], std[i], plan["dtype"]))
                report["counts_per_class"][label] += 1
                if mode != "RGB":
                    report["converted"].setdefault(mode, []).append(key)
        report["num_records"] += len(good)
        progress.update(len(done))
    writer.close()
    report.update(bytes=os.path.getsize(tmp), sha256=storage.sha256_file(tmp))  # checked when the shard is read
    storage.publish(tmp, storage.path(out_dir) / name)  # on disk (or uploaded whole) before its report exists
    if scratch:
        os.rmdir(scratch)
    storage.write_json_atomic(_report_path(out_dir, index, plan["num_shards"]), report)
    return report


def _report_path(out_dir: str, index: int, count: int) -> epath.Path:
    return storage.path(out_dir) / latents.report_name(index, count)


def set_aside_damaged_shards(out_dir: str, plan: dict[str, Any], *, verify: bool) -> dict[str, str]:
    """Finished shards that are missing or differ from their report (size; ``verify``: SHA-256):
    each is renamed ``<shard>.damaged[-N]`` and its report removed, so this run encodes it again."""
    damaged = {}
    for index in range(plan["num_shards"]):
        report_path = _report_path(out_dir, index, plan["num_shards"])
        if not report_path.exists():
            continue
        try:
            report = storage.read_json(report_path)
            problem = latents.shard_problems(out_dir, [report], verify=verify).get(report["file"])
        except (OSError, ValueError, KeyError) as err:
            report, problem = {"file": latents.shard_name(index, plan["num_shards"])}, f"unreadable report: {err}"
        if problem is None:
            continue
        damaged[report["file"]] = problem
        shard = storage.path(out_dir) / report["file"]
        if shard.exists():
            aside, n = shard.with_name(shard.name + ".damaged"), 1
            while aside.exists():
                n += 1
                aside = shard.with_name(f"{shard.name}.damaged-{n}")
            shard.rename(aside)  # in a bucket: a copy, then the original's deletion
        report_path.unlink()
        logging.warning("%s is damaged (%s): it is encoded again (the old file, if any, is kept as .damaged)",
                        report["file"], problem)
    if damaged and (storage.path(out_dir) / latents.METADATA).exists():
        (storage.path(out_dir) / latents.METADATA).unlink()  # no longer finished: rewritten at the end
    return damaged


def _read_reports(out_dir: str, plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [storage.read_json(_report_path(out_dir, i, plan["num_shards"])) for i in range(plan["num_shards"])]


def finish(out_dir: str, plan: dict[str, Any], reports: list[dict[str, Any]],
           ignored: list[dict[str, str]]) -> dict[str, Any]:
    """Merge the shard reports into ``metadata.json``: totals, counts per class, the shards' sizes and
    checksums, skipped, converted and ignored files."""
    skipped = [s for r in reports for s in r["skipped"]]
    converted: dict[str, list[str]] = {}
    for r in reports:
        for mode, keys in r["converted"].items():
            converted.setdefault(mode, []).extend(keys)
    metadata = dict(plan)
    metadata.update(
        num_images=sum(r["num_records"] for r in reports),
        counts_per_class=[int(sum(c)) for c in zip(*(r["counts_per_class"] for r in reports))],
        shards=[{k: r[k] for k in ("file", "num_records", "bytes", "sha256")} for r in reports],
        num_skipped=len(skipped),
        skipped=skipped,
        converted_to_rgb=converted,
        num_ignored=len(ignored),
        ignored=ignored,
    )
    storage.write_json_atomic(storage.path(out_dir) / latents.METADATA, metadata)
    return metadata


def extract(source: images.ImageSource, model: vae_lib.AutoencoderKL, out_dir: str, *, vae: str,
            resolution: int = 256, dtype: str = "float16", images_per_shard: int = 10_000,
            batch_size: int = 64, workers: int | None = None, verify: bool = False) -> dict[str, Any]:
    """Encode ``source`` with ``model`` (the VAE named by ``vae``, a folder or hub id) into ``out_dir``,
    resuming what a previous run left; returns the metadata.

    This process takes shards ``process_index, process_index + process_count, ...``; each
    batch (rounded up to a multiple of the local device count) is split over local devices.
    Every run first checks the finished shards' sizes (``verify``: their SHA-256) and encodes
    damaged ones again.
    """
    check_settings(resolution=resolution, images_per_shard=images_per_shard, batch_size=batch_size, workers=workers)
    out_dir = storage.absolute(out_dir)  # as typed (relative, ~, a trailing slash), resolved once
    devices = jax.local_devices()
    batch_size = -(-batch_size // len(devices)) * len(devices)
    encoding = {"batch_size": batch_size, "devices_per_process": len(devices), "device_kind": devices[0].device_kind,
                "jax": jax.__version__}
    vae_name, vae_weights = describe_vae(vae)
    plan = make_plan(source, vae=vae_name, vae_weights=vae_weights, vae_config=model.config, resolution=resolution,
                     dtype=dtype, images_per_shard=images_per_shard, encoding=encoding)
    with locking.hold(out_dir, purpose="latent extraction"):  # one extractor per --out (one lock per pod)
        return _extract_locked(source, model, out_dir, plan, devices=devices, workers=workers, verify=verify)


def _extract_locked(source: images.ImageSource, model: vae_lib.AutoencoderKL, out_dir: str, plan: dict[str, Any], *,
                    devices: list[jax.Device], workers: int | None, verify: bool) -> dict[str, Any]:
    _check_same_plan(out_dir, plan, write=jax.process_index() == 0)  # every process refuses alike
    if jax.process_index() == 0:
        set_aside_damaged_shards(out_dir, plan, verify=verify)
    sharding.sync_processes("dit_jax.latent_extraction: plan")
    if jax.process_index() != 0:
        _check_same_plan(out_dir, plan, write=False)  # this host's devices must encode as process 0's do
    metadata_path = storage.path(out_dir) / latents.METADATA
    if jax.process_index() == 0 and metadata_path.exists():
        try:
            storage.read_json(metadata_path)
        except ValueError as err:  # cut short: written again below from the shards' reports
            logging.warning("%s; it is written again", err)
            metadata_path.unlink()
    sharding.sync_processes("dit_jax.latent_extraction: metadata")
    if metadata_path.exists():
        logging.info("%s is complete (every shard %s); nothing to do", out_dir,
                     "verified against its SHA-256" if verify else "of the size written")
        return storage.read_json(metadata_path)

    mine = [i for i in range(jax.process_index(), plan["num_shards"], jax.process_count())
            if not _report_path(out_dir, i, plan["num_shards"]).exists()]
    per_shard = plan["images_per_shard"]
    todo = sum(min(per_shard, len(source) - i * per_shard) for i in mine)
    logging.info("encoding %d images in %d shards (of %d) on %d device(s)", todo, len(mine), plan["num_shards"],
                 len(devices))
    encode = make_encoder(model, devices)
    with (concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool,
          tqdm.tqdm(total=todo, unit="img", desc=f"host {jax.process_index()}", file=sys.stderr,
                    smoothing=0.05) as progress):
        for index in mine:
            write_shard(source, index, plan, encode, out_dir, batch_size=plan["encoding"]["batch_size"], pool=pool,
                        progress=progress)
    sharding.sync_processes("dit_jax.latent_extraction: shards")
    reports = _read_reports(out_dir, plan)
    if not sum(r["num_records"] for r in reports):  # on every process: all of them fail
        skipped = [s for r in reports for s in r["skipped"]]
        examples = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:3])
        raise RuntimeError(f"none of the {plan['num_source_images']} images could be encoded, so {out_dir} is not "
                           f"a dataset (no {latents.METADATA} written). All were skipped, e.g. {examples} (each shard's "
                           ".json report lists them); give a folder of readable images and an empty --out folder")
    if jax.process_index() == 0:
        metadata = finish(out_dir, plan, reports, source.ignored)
        logging.info("%d images encoded, %d skipped, %d files ignored (listed in %s)", metadata["num_images"],
                     metadata["num_skipped"], metadata["num_ignored"], metadata_path)
    sharding.sync_processes("dit_jax.latent_extraction: done")
    return storage.read_json(metadata_path)
