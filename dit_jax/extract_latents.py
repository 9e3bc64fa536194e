"""Pre-encode images into SD-VAE latents: ``python -m dit_jax.extract_latents``.

Every image is ADM-centre-cropped, then it and its horizontal flip are encoded; the
posterior mean and std (not one fixed sample) are stored in float16/bfloat16 ArrayRecord
shards (format: ``dit_jax.latents``). The work is split by shard over hosts and each batch
over the host's local devices. A shard is written under a temporary name, renamed, then
its ``.json`` report is written: a killed run resumes at the first shard without a report,
and a finished folder is left as it is. Bad images are skipped and listed, never fatal.

    python -m dit_jax.extract_latents --images=/data/imagenet/train --out=/data/latents256 \\
        --vae=stabilityai/sd-vae-ft-ema --resolution=256
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags, logging
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import images, latents
from dit_jax import vae as vae_lib

# One record per group: training reads single records in random order.
WRITER_OPTIONS = "group_size:1,uncompressed"

Encoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def make_encoder(model: vae_lib.AutoencoderKL, devices: list[jax.Device]) -> Encoder:
    """uint8 images [B, S, S, 3] -> posterior (mean, std) [B, 2, h, w, c] of (image, its flip), B split over devices."""
    mesh = Mesh(np.asarray(devices), ("data",))
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    data = NamedSharding(mesh, P("data"))

    @jax.jit
    def encode(state, pixels):
        x = pixels.astype(jnp.float32) / 127.5 - 1.0  # ToTensor + Normalize(0.5, 0.5)
        both = jnp.stack([x, x[:, :, ::-1]], axis=1)  # [B, 2, S, S, 3]
        b = x.shape[0]
        mean, logvar = nnx.merge(graphdef, state).encode(both.reshape(2 * b, *x.shape[1:]))
        std = jnp.exp(0.5 * logvar)
        return mean.reshape(b, 2, *mean.shape[1:]), std.reshape(b, 2, *std.shape[1:])

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = encode(state, jax.device_put(pixels, data))
        return np.asarray(mean), np.asarray(std)

    return run


def make_plan(source: images.ImageSource, *, vae: str, vae_config: vae_lib.VAEConfig, resolution: int,
              dtype: str, images_per_shard: int) -> dict[str, Any]:
    """Everything that determines the output; a resumed run must have the same plan."""
    factor = vae_config.downsample_factor
    if resolution % factor:
        raise ValueError(f"resolution must be a multiple of {factor} (the VAE's downsampling), got {resolution}")
    if dtype not in latents.STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(latents.STORAGE_DTYPES)}, got {dtype!r}")
    return {
        "format": "dit_jax latents v1: int32 label, mean[2,h,w,c], std[2,h,w,c]; view 0 = image, 1 = its flip",
        "vae": vae, "vae_config": dataclasses.asdict(vae_config),
        "scale_factor": vae_config.scaling_factor, "resolution": resolution,
        "latent_shape": [resolution // factor, resolution // factor, vae_config.latent_channels],
        "dtype": dtype, "source": source.describe(), "num_source_images": len(source),
        "images_per_shard": images_per_shard, "num_shards": -(-len(source) // images_per_shard),
    }


def _check_same_plan(out_dir: str, plan: dict[str, Any]) -> None:
    """Start a new folder, or resume one made by the same command; never mix two extractions."""
    path = os.path.join(out_dir, latents.PLAN)
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as stored
    if not os.path.exists(path):
        if any(f.startswith("shard-") for f in os.listdir(out_dir)):
            raise FileExistsError(f"{out_dir} holds shards but no {latents.PLAN}: choose an empty --out folder")
        latents.write_json_atomic(path, plan)
        return
    old = latents.read_json(path)
    changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    if changed:
        raise FileExistsError(f"{out_dir} holds a different extraction (differs in: {', '.join(changed)}); "
                              "re-run with the same settings to resume it, or choose another --out folder")


def _batches(records: Iterator[images.Record], size: int) -> Iterator[list[images.Record]]:
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _prepare(record: images.Record, resolution: int) -> tuple[str, np.ndarray | str, int, str]:
    """(key, crop or the reason it was skipped, label, original mode)."""
    key, data, label = record
    if isinstance(data, OSError):
        return key, f"unreadable: {data}", label, ""
    try:
        pixels, mode = images.preprocess(data, resolution)
    except images.BadImage as err:
        return key, str(err), label, ""
    return key, pixels, label, mode


def write_shard(source: images.ImageSource, index: int, plan: dict[str, Any], encode: Encoder, out_dir: str, *,
                batch_size: int, pool: concurrent.futures.Executor, progress: tqdm.tqdm) -> dict[str, Any]:
    """Encode shard ``index`` into its ArrayRecord file and write its report; returns the report."""
    name = latents.shard_name(index, plan["num_shards"])
    start = index * plan["images_per_shard"]
    stop = min(start + plan["images_per_shard"], plan["num_source_images"])
    report: dict[str, Any] = {"file": name, "first_image": start, "num_records": 0,
                              "counts_per_class": [0] * source.num_classes, "skipped": [], "converted": {}}
    tmp = os.path.join(out_dir, name + ".tmp")
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    chunks = _batches(source.records(start, stop), batch_size)
    prepare = functools.partial(_prepare, resolution=plan["resolution"])
    pending = [pool.submit(prepare, r) for r in next(chunks, [])]
    while pending:
        done = [f.result() for f in pending]
        pending = [pool.submit(prepare, r) for r in next(chunks, [])]  # decode the next batch meanwhile
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
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # on disk before it gets its final name
    os.replace(tmp, os.path.join(out_dir, name))
    latents.write_json_atomic(_report_path(out_dir, index, plan["num_shards"]), report)
    return report


def _report_path(out_dir: str, index: int, count: int) -> str:
    return os.path.join(out_dir, latents.shard_name(index, count)[:-len(".array_record")] + ".json")


def finish(out_dir: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Merge the shard reports into ``metadata.json``: totals, counts per class, skipped and converted files."""
    reports = [latents.read_json(_report_path(out_dir, i, plan["num_shards"])) for i in range(plan["num_shards"])]
    converted: dict[str, list[str]] = {}
    for r in reports:
        for mode, keys in r["converted"].items():
            converted.setdefault(mode, []).extend(keys)
    metadata = dict(plan)
    metadata.update(
        num_images=sum(r["num_records"] for r in reports),
        counts_per_class=[int(sum(c)) for c in zip(*(r["counts_per_class"] for r in reports))],
        shards=[{"file": r["file"], "num_records": r["num_records"]} for r in reports],
        num_skipped=sum(len(r["skipped"]) for r in reports),
        skipped=[s for r in reports for s in r["skipped"]],
        converted_to_rgb=converted,
    )
    latents.write_json_atomic(os.path.join(out_dir, latents.METADATA), metadata)
    return metadata


def _sync(stage: str) -> None:
    """Wait for every host (a no-op on one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"dit_jax.extract_latents: {stage}")


def extract(source: images.ImageSource, model: vae_lib.AutoencoderKL, out_dir: str, *, vae: str,
            resolution: int = 256, dtype: str = "float16", images_per_shard: int = 10_000,
            batch_size: int = 64, workers: int | None = None) -> dict[str, Any]:
    """Encode ``source`` into ``out_dir`` (resuming what a previous run left); returns the metadata.

    This process takes shards ``process_index, process_index + process_count, ...``; each
    batch (rounded up to a multiple of the local device count) is split over local devices.
    """
    os.makedirs(out_dir, exist_ok=True)
    plan = make_plan(source, vae=vae, vae_config=model.config, resolution=resolution, dtype=dtype,
                     images_per_shard=images_per_shard)
    if jax.process_index() == 0:
        _check_same_plan(out_dir, plan)
    _sync("plan")
    if os.path.exists(os.path.join(out_dir, latents.METADATA)):
        logging.info("%s is complete; nothing to do", out_dir)
        return latents.read_json(os.path.join(out_dir, latents.METADATA))

    devices = jax.local_devices()
    batch_size = -(-batch_size // len(devices)) * len(devices)
    mine = [i for i in range(jax.process_index(), plan["num_shards"], jax.process_count())
            if not os.path.exists(_report_path(out_dir, i, plan["num_shards"]))]
    todo = sum(min(images_per_shard, len(source) - i * images_per_shard) for i in mine)
    logging.info("encoding %d images in %d shards (of %d) on %d device(s)", todo, len(mine), plan["num_shards"],
                 len(devices))
    encode = make_encoder(model, devices)
    with (concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool,
          tqdm.tqdm(total=todo, unit="img", desc=f"host {jax.process_index()}", file=sys.stderr,
                    smoothing=0.05) as progress):
        for index in mine:
            write_shard(source, index, plan, encode, out_dir, batch_size=batch_size, pool=pool, progress=progress)
    _sync("shards")
    if jax.process_index() == 0:
        metadata = finish(out_dir, plan)
        logging.info("%d images encoded, %d skipped (listed in %s)", metadata["num_images"],
                     metadata["num_skipped"], os.path.join(out_dir, latents.METADATA))
    _sync("done")
    return latents.read_json(os.path.join(out_dir, latents.METADATA))


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    flags.DEFINE_string("images", None, "image folder: ImageFolder tree <dir>/<class>/* (e.g. ImageNet train/) or "
                        "a flat folder of images (one class)")
    flags.DEFINE_string("tfds_name", None, "instead of --images: a TensorFlow Datasets name, e.g. imagenet2012")
    flags.DEFINE_string("tfds_split", "train", "the tfds split to encode")
    flags.DEFINE_string("tfds_data_dir", None, "tfds data_dir (where the prepared dataset lives or will be prepared)")
    flags.DEFINE_string("tfds_manual_dir", None, "tfds manual download dir (ImageNet: ILSVRC2012_img_train.tar)")
    flags.DEFINE_string("out", None, "output folder for the shards and metadata.json (resumed if it exists)")
    flags.DEFINE_string("vae", vae_lib.HUB_VAES[0], "diffusers VAE folder (config.json + weights) or hub id "
                        f"({' or '.join(vae_lib.HUB_VAES)})")
    flags.DEFINE_integer("resolution", 256, "image size; latents are resolution / 8")
    flags.DEFINE_enum("dtype", "float16", sorted(latents.STORAGE_DTYPES), "storage dtype of mean and std")
    flags.DEFINE_integer("images_per_shard", 10_000, "images per ArrayRecord shard (the unit of resumption)")
    flags.DEFINE_integer("batch_size", 64, "images per encoder call on this host (x2 with the flips)")
    flags.DEFINE_integer("workers", None, "decode/crop threads (default: CPU count)")
    flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() (run the same command "
                      "on every host; each encodes its share of the shards)")


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if (f.images is None) == (f.tfds_name is None) or not f.out:
        raise app.UsageError("give --out and exactly one of --images and --tfds_name")
    if f.distributed:
        jax.distributed.initialize()
    source = (images.FolderSource(f.images) if f.images else
              images.TfdsSource(f.tfds_name, split=f.tfds_split, data_dir=f.tfds_data_dir,
                                manual_dir=f.tfds_manual_dir))
    model = vae_lib.load_vae(f.vae)
    extract(source, model, f.out, vae=f.vae, resolution=f.resolution, dtype=f.dtype,
            images_per_shard=f.images_per_shard, batch_size=f.batch_size, workers=f.workers)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
