"""Sampling: class-conditional images from a DiT, with classifier-free guidance; ``python -m dit_jax.sample``.

``generate`` draws a batch inside training (one key for the batch). The sampling engine
(``create_image_sampler``, ``iterate_blocks``, ``sample_uint8``) is what the command and the
``fid`` evaluator use: one jitted program (reverse chain + guidance + VAE decode + the
official uint8 conversion) per block of ``per_device_batch`` samples on every device of a
mesh, where sample ``j`` depends only on ``(seed, j)`` (its labels, start noise and step
noise come from ``fold_in(key(seed), j)``), so 1 device, 8 devices and a resumed run give
the same bytes. ``write_samples`` runs it resumably into an ADM-format ``samples.npz``.

Picture mode, the official ``sample.py`` (a PNG grid of the 8 official classes, guidance 4.0;
``sample_picture`` in a notebook)::

    python -m dit_jax.sample --ckpt DiT-XL-2-256x256.pt --png sample.png   # --vae mse, as sample.py

FID mode, the official ``sample_ddp.py`` made resumable (guidance 1.5, uniform random labels, ``--vae ema``;
``--out`` is locked, ``dit_jax.locking``)::

    python -m dit_jax.sample --ckpt DiT-XL-2-256x256.pt --num_samples 50000 --out samples/xl2_cfg1.5
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax import compilation_cache, console, diffusion as gd, locking, sharding, storage
from dit_jax.fid import adm_npz
from dit_jax.image_grid import save_grid, to_uint8
from dit_jax.latents import write_json_atomic
from dit_jax.models import ATTENTION_IMPLEMENTATIONS, GUIDANCE_MODES, OFFICIAL_GUIDANCE_CHANNELS, DiT, check_labels
from dit_jax.weights.load import load_dit

SAMPLERS = ("ddpm", "ddim")
# The official sample.py's classes: 207 golden retriever, 360 otter, 387 red panda, 974 geyser,
# 88 macaw, 979 valley, 417 balloon, 279 arctic fox.
OFFICIAL_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
SAMPLES_NPZ, SETTINGS_JSON, BLOCKS_DIR = "samples.npz", "settings.json", "blocks"


def _chain(model: DiT, diffusion: gd.Diffusion, labels: jax.Array, noise: jax.Array, key: jax.Array,
           cfg_scale: jax.Array | float, *, guided: bool, sampler: str, eta: float) -> jax.Array:
    """The reverse chain from x_T = ``noise`` for ``labels``; ``key``: one key or one per sample.

    Guided (the official sampler): the batch is doubled, conditional half then null half on
    the same latents, and the conditional half is kept. Unguided: the model on the labels.
    """
    n = labels.shape[0]
    if guided:
        z = jnp.concatenate([noise, noise])
        y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
        if gd.per_sample_keys(key):
            key = jnp.concatenate([key, key])

        def model_fn(x, t):
            return model.forward_with_cfg(x, t, y, cfg_scale)
    else:
        z = noise

        def model_fn(x, t):
            return model(x, t, labels)

    if sampler == "ddpm":
        out = gd.p_sample_loop(diffusion, model_fn, z, key)
    else:
        out = gd.ddim_sample_loop(diffusion, model_fn, z, key, eta=eta)
    return out[:n]


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "eta"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, diffusion: gd.Diffusion, labels: jax.Array,
              key: jax.Array, cfg_scale: jax.Array, *, sampler: str, eta: float) -> jax.Array:
    model = nnx.merge(graphdef, state)
    noise_key, loop_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, (labels.shape[0], model.input_size, model.input_size, model.in_channels))
    return _chain(model, diffusion, labels, noise, loop_key, cfg_scale, guided=True, sampler=sampler, eta=eta)


def _check_labels(labels: Any, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers [N], got dtype {labels.dtype}, shape {labels.shape}")
    check_labels(labels, num_classes, allow_null=False)
    return labels.astype(np.int32)


def _check_guidance(model: DiT, sampler: str, cfg_scale: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if cfg_scale != 1.0 and model.y_embedder.dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a null label: this model was built with "
                         "class_dropout_prob=0; sample it with cfg_scale 1.0 (no guidance)")


def generate(model: DiT, diffusion: gd.Diffusion, labels: jax.Array, key: jax.Array, *,
             cfg_scale: float = 4.0, sampler: str = "ddpm", eta: float = 0.0) -> jax.Array:
    """Samples [N, H, W, C] for ``labels`` [N] (int, < num_classes) with guidance ``cfg_scale``.

    ``diffusion`` sets the chain (e.g. ``create_diffusion("250")`` for the paper's 250 DDPM
    steps); guidance needs a model trained with label dropout (it has a null label). The
    whole batch shares ``key``: the trainer's periodic grids. For samples that do not depend
    on the batch (FID), use ``sample_uint8``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if model.y_embedder.dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a null label: this model was built with class_dropout_prob=0")
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    check_labels(labels, model.num_classes, allow_null=False)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, diffusion, labels, key, jnp.float32(cfg_scale), sampler=sampler, eta=eta)


# ---------------------------------------------------------------- per-sample randomness


def _sample_keys(seed: jax.Array, indices: jax.Array) -> jax.Array:
    """[N, 3] keys of samples ``indices``: (label, start noise, step noise), from ``fold_in(key(seed), j)``."""
    base = jax.random.key(seed)
    return jax.vmap(lambda j: jax.random.split(jax.random.fold_in(base, j), 3))(indices)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _random_labels(seed: jax.Array, indices: jax.Array, num_classes: int) -> jax.Array:
    keys = _sample_keys(seed, indices)[:, 0]
    return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes, dtype=jnp.int32))(keys)


def random_labels(seed: int, num_samples: int, num_classes: int) -> np.ndarray:
    """Uniform random class labels [N] as ``sample_ddp.py`` draws them; label ``j`` depends only on (seed, j)."""
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples}, {num_classes}")
    return np.asarray(_random_labels(np.uint32(seed), np.arange(num_samples, dtype=np.int32), num_classes))


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """Labels ``j % num_classes``: every class equally often (50 each of 1000 in 50,000), mixed in every block."""
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples}, {num_classes}")
    return np.arange(num_samples, dtype=np.int32) % num_classes


# ---------------------------------------------------------------- the sampling engine


class NonFiniteSampleError(FloatingPointError):
    """A sample came out NaN or infinite; nothing of its block was written."""


@dataclasses.dataclass(frozen=True)
class ImageSampler:
    """One compiled program that samples a block of ``block_size`` consecutive sample indices on ``mesh``.

    Made by ``create_image_sampler``; ``settings`` are what determines the images (besides
    the weights, seed and labels).
    """

    mesh: Mesh
    per_device_batch: int
    image_shape: tuple[int, int, int]
    settings: dict[str, Any]
    program: Callable[..., tuple[jax.Array, jax.Array]]
    states: tuple[nnx.State, nnx.State | None, jax.Array]

    @property
    def block_size(self) -> int:
        """Samples per program call: ``per_device_batch`` on each batch shard of the mesh."""
        return self.per_device_batch * sharding.batch_shards(self.mesh)

    def dispatch(self, seed: int, start: int, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Start sampling indices ``start .. start + block_size - 1`` (asynchronously): (uint8 images, finite)."""
        indices = np.arange(start, start + self.block_size, dtype=np.int32)
        batch = sharding.batch_from_global({"index": indices, "label": np.asarray(labels, np.int32)}, self.mesh)
        seed = jax.device_put(np.uint32(seed), NamedSharding(self.mesh, P()))
        return self.program(*self.states, seed, batch["index"], batch["label"])


def create_image_sampler(model: DiT, diffusion: gd.Diffusion, *, cfg_scale: float, sampler: str = "ddpm",
                         eta: float = 0.0, vae: Any | None = None, per_device_batch: int = 32,
                         mesh: Mesh | None = None) -> ImageSampler:
    """The engine for ``model`` (guided when ``cfg_scale != 1``) on ``mesh`` (default: every device of every host).

    With ``vae`` (a ``vae.AutoencoderKL``) the latents are divided by its scaling factor and
    decoded; without, the model's samples are the images (pixel-space models). Each device
    runs the same per-device program on its ``per_device_batch`` samples (``shard_map``), so
    a fixed per-device batch gives the same bytes on any number of devices. The weights are
    replicated over the mesh; the batch is split over its ``data`` x ``fsdp`` axes.
    """
    _check_guidance(model, sampler, cfg_scale)
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), as in the official sampler; got {cfg_scale}")
    if per_device_batch < 1:
        raise ValueError(f"per_device_batch must be >= 1, got {per_device_batch}")
    learn_sigma = model.out_channels == 2 * model.in_channels
    if diffusion.learn_sigma != learn_sigma:
        raise ValueError(f"the diffusion has learn_sigma={diffusion.learn_sigma} but the model "
                         f"{'predicts' if learn_sigma else 'does not predict'} its variance")
    if vae is not None and vae.config.latent_channels != model.in_channels:
        raise ValueError(f"the model samples {model.in_channels}-channel arrays but the VAE decodes "
                         f"{vae.config.latent_channels}-channel latents: a pixel-space model needs no VAE")
    mesh = sharding.create_mesh({"data": -1}) if mesh is None else mesh
    guided = cfg_scale != 1.0
    latent_shape = (model.input_size, model.input_size, model.in_channels)
    dit_graphdef, dit_state = nnx.split(model)
    vae_graphdef, vae_state = nnx.split(vae) if vae is not None else (None, None)
    scale = vae.config.scaling_factor if vae is not None else 1.0

    def per_device(dit_state, vae_state, cfg_scale, seed, indices, labels):
        keys = _sample_keys(seed, indices)
        noise = jax.vmap(lambda k: jax.random.normal(k, latent_shape))(keys[:, 1])
        x = _chain(nnx.merge(dit_graphdef, dit_state), diffusion, labels, noise, keys[:, 2], cfg_scale,
                   guided=guided, sampler=sampler, eta=eta)
        if vae_graphdef is not None:
            x = nnx.merge(vae_graphdef, vae_state).decode(x / scale)
        finite = jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
        return to_uint8(x), finite

    batch, replicated = P(sharding.BATCH_AXES), P()
    program = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(replicated,) * 4 + (batch, batch),
                                    out_specs=(batch, batch)))
    # The scale is an argument, not a constant: one compiled program serves every guided scale.
    states = jax.device_put((dit_state, vae_state, np.float32(cfg_scale)), NamedSharding(mesh, replicated))
    image_shape = jax.eval_shape(lambda: per_device(dit_state, vae_state, jnp.float32(cfg_scale), jnp.uint32(0),
                                                    jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)))[0].shape[1:]
    settings = {"cfg_scale": float(cfg_scale), "guided": guided, "guidance": model.guidance,
                "guidance_channels": (OFFICIAL_GUIDANCE_CHANNELS if model.guidance == "official"
                                      else model.in_channels) if guided else 0,
                "sampler": sampler, "eta": float(eta) if sampler == "ddim" else None,
                "num_sampling_steps": diffusion.num_timesteps,
                "timesteps": np.asarray(diffusion.timestep_map).tolist(),
                "dtype": jnp.dtype(model.dtype).name, "latent_shape": list(latent_shape),
                "vae_scaling_factor": scale if vae is not None else None, "image_shape": list(image_shape),
                "per_device_batch": per_device_batch}
    return ImageSampler(mesh=mesh, per_device_batch=per_device_batch, image_shape=tuple(image_shape),
                        settings=settings, program=program, states=states)


class Block(NamedTuple):
    """Samples ``start .. start + len(labels) - 1``: uint8 images [n, H, W, C] and their labels."""

    start: int
    images: np.ndarray
    labels: np.ndarray


def iterate_blocks(image_sampler: ImageSampler, labels: np.ndarray, *, seed: int, start: int = 0) -> Iterator[Block]:
    """The samples of ``labels[start:]`` block by block, on every process (the next block runs meanwhile).

    The last block is padded to the full block size (the same program shape) and cut.
    Raises ``NonFiniteSampleError`` naming the block and seed before yielding a block with
    a NaN or infinite sample.
    """
    n, size = len(labels), image_sampler.block_size

    def launch(first: int) -> tuple[int, tuple[jax.Array, jax.Array]]:
        block_labels = np.zeros(size, np.int32)
        block_labels[:min(size, n - first)] = labels[first:first + size]
        return first, image_sampler.dispatch(seed, first, block_labels)

    pending = launch(start) if start < n else None
    while pending is not None:
        first, result = pending
        pending = launch(first + size) if first + size < n else None  # keep the devices busy while we write
        count = min(size, n - first)
        images, finite = (np.asarray(a)[:count] for a in multihost_utils.process_allgather(result, tiled=True))
        if not finite.all():
            bad = (first + np.flatnonzero(~finite)).tolist()
            raise NonFiniteSampleError(
                f"{len(bad)} sample(s) of block {first}..{first + count - 1} are not finite (NaN or inf), e.g. "
                f"indices {bad[:5]}, with seed {seed}; stopped before writing that block. Check the weights "
                f"(a diverged checkpoint?) and the dtype; earlier blocks are kept")
        yield Block(first, images, labels[first:first + count])


def sample_uint8(model: DiT, diffusion: gd.Diffusion, labels: np.ndarray, *, seed: int, cfg_scale: float,
                 sampler: str = "ddpm", eta: float = 0.0, vae: Any | None = None, per_device_batch: int = 32,
                 mesh: Mesh | None = None) -> np.ndarray:
    """uint8 images [N, H, W, C] for ``labels`` [N] on ``mesh`` (see ``create_image_sampler``), on every process.

    Sample ``j`` depends only on (seed, j, its label), not on N, the mesh or the block.
    """
    labels = _check_labels(labels, model.num_classes)
    engine = create_image_sampler(model, diffusion, cfg_scale=cfg_scale, sampler=sampler, eta=eta, vae=vae,
                                  per_device_batch=per_device_batch, mesh=mesh)
    progress = console.ProgressLog(f"sampling ({len(diffusion.timestep_map)} {sampler} steps a block)", len(labels),
                                   "images")
    blocks = []
    for block in iterate_blocks(engine, labels, seed=seed):
        blocks.append(block.images)
        progress.update(len(block.images))
    return np.concatenate(blocks)


# ---------------------------------------------------------------- FID mode: resumable blocks -> ADM npz


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


def write_block(blocks_dir: str, block: Block) -> None:
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


def _settings_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k, '(unset)')!r} then, {new.get(k, '(unset)')!r} now"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


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
        changed = _settings_differences(old.get("settings", {}), record["settings"])
        if changed:
            raise ValueError(f"{out_dir} holds samples made with other settings ({'; '.join(changed)}); rerun with "
                             "the old settings to resume, or choose another --out folder")
    elif ((out / BLOCKS_DIR).exists() and any((out / BLOCKS_DIR).iterdir())) or (out / SAMPLES_NPZ).exists():
        raise FileExistsError(f"{out_dir} holds samples but no {SETTINGS_JSON}: choose an empty --out folder")
    else:
        write_json_atomic(path, record)
    (out / BLOCKS_DIR).mkdir(parents=True, exist_ok=True)  # only once the folder is this run's
    if (out / SAMPLES_NPZ).exists():
        return None
    for block in (out / BLOCKS_DIR).iterdir():
        if block.name.endswith(".tmp"):  # a block a killed run was writing
            block.unlink()
    set_aside_damaged_blocks(os.fspath(out / BLOCKS_DIR), image_shape)
    return missing_ranges(os.fspath(out / BLOCKS_DIR), record["settings"]["num_samples"])


def write_samples(out_dir: str, image_sampler: ImageSampler, labels: np.ndarray, *, seed: int,
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


def _write_samples_locked(out_dir: str, image_sampler: ImageSampler, labels: np.ndarray, *, seed: int,
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
            for block in iterate_blocks(image_sampler, labels[:stop], seed=seed, start=first):
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
        write_json_atomic(storage.path(out_dir) / SETTINGS_JSON, record)
        for first, stop in blocks:
            (storage.path(blocks_dir) / block_name(first, stop)).unlink()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dit_jax.sample: samples.npz written")
    return npz


def save_picture_grid(path: str, images: np.ndarray, *, nrow: int = 4) -> None:
    """uint8 images [N, H, W, C] as one PNG, ``nrow`` a row as the official ``save_image`` (white padding)."""
    cols = min(nrow, len(images))
    rows = -(-len(images) // cols)
    padded = np.full((rows * cols, *images.shape[1:]), 255, np.uint8)
    padded[:len(images)] = images
    save_grid(path, padded.reshape(rows, cols, *images.shape[1:]), scale=1)


# ---------------------------------------------------------------- the command


def parse_labels(text: str, num_classes: int) -> np.ndarray:
    """``--labels 207,360,...`` -> int32 [N], each in [0, num_classes)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise ValueError(f"labels must be comma-separated class indices such as 207,360,387; got {text!r}")
    labels = np.array([int(p) for p in parts], np.int32)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be class indices in [0, {num_classes - 1}] (the checkpoint has "
                         f"{num_classes} classes); got {[int(v) for v in labels if not 0 <= v < num_classes]}")
    return labels


def load_decoder(name: str) -> Any | None:
    """The ``--vae`` choice: ``ema`` / ``mse`` (the SD VAEs, fetched), a diffusers VAE folder or hub id, or ``none``."""
    from dit_jax import vae as vae_lib  # not needed for pixel-space models

    if name == "none":
        return None
    return vae_lib.load_vae(HUB_VAES.get(name, name))


def released_checkpoint(image_size: int) -> str:
    """The registry name of the released DiT-XL/2 for ``image_size`` (256 or 512), fetched by ``weights.load.load_dit``."""
    if image_size not in (256, 512):
        raise ValueError(f"the released DiT-XL/2 checkpoints are 256x256 and 512x512; got image size {image_size}")
    return f"DiT-XL-2-{image_size}x{image_size}.pt"


def _sampling_chain(model: DiT, num_sampling_steps: int) -> gd.Diffusion:
    if num_sampling_steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {num_sampling_steps}")
    return gd.create_diffusion(str(num_sampling_steps), learn_sigma=model.out_channels == 2 * model.in_channels)


def sample_picture(model: DiT, vae: Any | None, labels: str | Any = OFFICIAL_LABELS, *, seed: int = 0,
                   cfg_scale: float = 4.0, num_sampling_steps: int = 250, sampler: str = "ddpm", eta: float = 0.0,
                   per_device_batch: int | None = None, png: str | None = None, mesh: Mesh | None = None) -> np.ndarray:
    """Picture mode (the official ``sample.py``): uint8 images [N, H, W, C] of ``labels``, and their grid in ``png``.

    ``labels``: class indices, or a string ``"207,360,..."`` (``parse_labels``). ``per_device_batch``
    ``None``: just enough samples per device for the labels in one program call (the bytes are
    those of ``sample_uint8`` with that per-device batch). The PNG (``save_picture_grid``, 4 a
    row) is written by process 0; every process returns the images.
    """
    labels = parse_labels(labels, model.num_classes) if isinstance(labels, str) else _check_labels(
        labels, model.num_classes)
    mesh = sharding.create_mesh({"data": -1}) if mesh is None else mesh
    if per_device_batch is None:
        per_device_batch = -(-len(labels) // sharding.batch_shards(mesh))
    images = sample_uint8(model, _sampling_chain(model, num_sampling_steps), labels, seed=seed, cfg_scale=cfg_scale,
                          sampler=sampler, eta=eta, vae=vae, per_device_batch=per_device_batch, mesh=mesh)
    if png is not None and sharding.is_main_process():
        save_picture_grid(png, images)
    return images


def run(ckpt: str, *, model: str | None = None, image_size: int | None = None, num_heads: int | None = None,
        vae: str | None = None, cfg_scale: float | None = None, num_sampling_steps: int = 250, sampler: str = "ddpm",
        eta: float = 0.0, guidance: str = "official", labels: str | None = None, seed: int = 0,
        png: str = "sample.png", num_samples: int | None = None, out: str | None = None,
        balanced: bool = False, per_device_batch: int = 32, dtype: str = "float32",
        attention: str = "auto") -> tuple[str, bool]:
    """The command: picture mode (``png``) or, with ``num_samples`` and ``out``, FID mode.

    Returns the file and whether this run wrote it (False: ``out`` was complete already). ``vae``
    defaults as the official scripts: ``mse`` for pictures (``sample.py``), ``ema`` for FID
    (``sample_ddp.py``); ``balanced``: labels ``j % classes`` instead of uniform random. Bad settings,
    checkpoints, labels and sizes raise ValueError (or FileNotFoundError) naming the problem.
    """
    fid_mode = out is not None
    if (num_samples is None) == fid_mode:
        raise ValueError("FID mode needs both --num_samples N and --out DIR; picture mode neither")
    if fid_mode and num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    if fid_mode and labels is not None:
        raise ValueError("--labels is for picture mode; FID mode draws uniform labels (or --balanced_labels)")
    if balanced and not fid_mode:
        raise ValueError("--balanced_labels is for FID mode (--num_samples and --out); picture mode takes --labels")
    if num_sampling_steps < 1 or per_device_batch < 1:
        raise ValueError(f"--num_sampling_steps and --per_device_batch must be >= 1, got {num_sampling_steps}, "
                         f"{per_device_batch}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image_size must be positive, got {image_size}")
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"--guidance {guidance!r} is not one of {GUIDANCE_MODES}")
    cfg_scale = cfg_scale if cfg_scale is not None else (1.5 if fid_mode else 4.0)
    vae = vae if vae is not None else ("ema" if fid_mode else "mse")

    loaded = load_dit(ckpt, model=model, image_size=image_size, num_heads=num_heads, dtype=dtype, attention=attention)
    net = loaded.model
    net.guidance = guidance
    decoder = load_decoder(vae)
    size = net.input_size * (decoder.config.downsample_factor if decoder is not None else 1)
    if image_size is not None and image_size != size:
        raise ValueError(f"--image_size {image_size} does not fit: the checkpoint's {net.input_size}x{net.input_size}"
                         f" model through this VAE makes {size}x{size} images")
    logging.info("%s: %s samples, %s %d steps, guidance %s (%s) on %d device(s)", ckpt,
                 num_samples if fid_mode else "picture", sampler, num_sampling_steps, cfg_scale, guidance,
                 jax.device_count())
    if not fid_mode:
        sample_picture(net, decoder, labels or ",".join(map(str, OFFICIAL_LABELS)), seed=seed, cfg_scale=cfg_scale,
                       num_sampling_steps=num_sampling_steps, sampler=sampler, eta=eta,
                       per_device_batch=per_device_batch, png=png)
        return png, True
    labels_array = (balanced_labels(num_samples, net.num_classes) if balanced
                    else random_labels(seed, num_samples, net.num_classes))
    engine = create_image_sampler(net, _sampling_chain(net, num_sampling_steps), cfg_scale=cfg_scale,
                                  sampler=sampler, eta=eta, vae=decoder, per_device_batch=per_device_batch)
    settings = {"ckpt": ckpt, "checkpoint": {k: v for k, v in loaded.info.items() if k != "path"},
                "weights_sha256": weights_digest(net, decoder),
                "vae": vae if vae in HUB_VAES or vae == "none" else os.path.abspath(vae),
                "image_size": size, "labels": "balanced" if balanced else "uniform"}
    complete = (storage.path(out) / SAMPLES_NPZ).exists()
    return write_samples(out, engine, labels_array, seed=seed, settings=settings), not complete


def _define_flags() -> None:
    """The command line. Defined only when run as a program, so any two modules import together."""
    from absl import flags

    flags.DEFINE_string("ckpt", None, "DiT checkpoint: an official name (DiT-XL-2-256x256.pt, fetched once), a local "
                        "official .pt, a diffusers DiT folder or hub id, or a dit_jax workdir (see dit_jax/weights/load.py).")
    flags.DEFINE_string("model", None, "Paper model (e.g. DiT-XL/2) for checkpoints that do not carry their "
                        "architecture; checked against the shapes (default: the checkpoint's, else DiT-XL/2).")
    flags.DEFINE_integer("num_heads", None, "Attention heads of a plain state dict of a non-paper width.")
    flags.DEFINE_integer("image_size", None, "Image size, 256 or 512 for the released models (default: the "
                         "checkpoint's); checked against the checkpoint and the VAE.")
    flags.DEFINE_string("vae", None, "VAE: ema or mse (stabilityai/sd-vae-ft-*), a diffusers VAE folder, or none "
                        "(a pixel-space model); default mse for pictures, ema for --num_samples, as the official "
                        "sample.py / sample_ddp.py.")
    flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale; 1 = none (default 4.0 for pictures, 1.5 "
                       "for --num_samples, as the official sample.py / sample_ddp.py).")
    flags.DEFINE_integer("num_sampling_steps", 250, "Sampling steps (the 1000-step chain respaced evenly).")
    flags.DEFINE_enum("sampler", "ddpm", list(SAMPLERS), "ddpm (ancestral, as the official code) or ddim.")
    flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).")
    flags.DEFINE_enum("guidance", "official", list(GUIDANCE_MODES),
                      f"Guide the first {OFFICIAL_GUIDANCE_CHANNELS} eps channels (official) or all of them.")
    flags.DEFINE_string("labels", None, "Picture mode: comma-separated classes (default: the official sample.py's "
                        f"{','.join(map(str, OFFICIAL_LABELS))}).")
    flags.DEFINE_integer("seed", 0, "Seed: sample j depends only on (seed, j).")
    flags.DEFINE_string("png", "sample.png", "Picture mode: where the grid goes.")
    flags.DEFINE_integer("num_samples", None, "FID mode: how many samples (e.g. 50000); needs --out.")
    flags.DEFINE_string("out", None, "FID mode: folder for blocks, samples.npz and settings.json (rerun the same "
                        "command to resume).")
    flags.DEFINE_bool("balanced_labels", False, "FID mode: labels j % classes (50 per class of 50,000) instead of "
                      "uniform random.")
    flags.DEFINE_integer("per_device_batch", 32, "Samples per device per program call (the bytes are identical on "
                         "any device count for one per-device batch).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "DiT compute dtype (the VAE decodes in float32).")
    flags.DEFINE_enum("attention", "auto", list(ATTENTION_IMPLEMENTATIONS), "DiT attention kernel: auto (cuDNN's "
                      "fused attention on NVIDIA GPUs in bfloat16, else XLA's), xla or cudnn.")
    sharding.define_distributed_flags()
    compilation_cache.define_flag()
    flags.mark_flag_as_required("ckpt")


# run()'s arguments and the flags that give them (the same name but one: a flag's value named balanced_labels
# would shadow the function balanced_labels() inside run()).
_RUN_FLAGS = {**{name: name for name in ("ckpt", "model", "image_size", "num_heads", "vae", "cfg_scale",
                                         "num_sampling_steps", "sampler", "eta", "guidance", "labels", "seed", "png",
                                         "num_samples", "out", "per_device_batch", "dtype", "attention")},
              "balanced": "balanced_labels"}


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    compilation_cache.enable(f.compilation_cache)
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    try:
        path, written = run(**{arg: f[name].value for arg, name in _RUN_FLAGS.items()})
    except (ValueError, OSError, locking.LockHeldError) as err:  # the user's to fix: one line, status 2
        print(f"dit_jax.sample: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as err:  # the run failed: one line, status 1
        raise SystemExit(f"dit_jax.sample: {err}") from None
    if sharding.is_main_process():
        print(f"wrote {path}" if written else f"{path} is complete (same settings); nothing to do")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
