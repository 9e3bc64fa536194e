"""The sampling engine: class-conditional images from a DiT with classifier-free guidance.

``generate`` draws a batch inside training (one key for the batch). The engine
(``create_image_sampler``, ``iterate_blocks``, ``sample_uint8``) is what the ``sample`` command
and the ``fid`` evaluator use: one jitted program (reverse chain + guidance + VAE decode + the
official uint8 conversion) per block of ``per_device_batch`` samples on every device of a
mesh, where sample ``j`` depends only on ``(seed, j)`` (its labels, start noise and step
noise come from ``fold_in(key(seed), j)``), so 1 device, 8 devices and a resumed run give
the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax import console, diffusion as gd, sharding
from dit_jax.models import OFFICIAL_GUIDANCE_CHANNELS, DiT, check_labels
from dit_jax.sampling.image_grid import to_uint8

SAMPLERS = ("ddpm", "ddim")
# The paper's guidance scales: 4.0 for pictures (the official sample.py), 1.5 for FID (sample_ddp.py, Table 4).
PICTURE_CFG_SCALE, FID_CFG_SCALE = 4.0, 1.5


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


def check_sample_labels(labels: Any, num_classes: int) -> np.ndarray:
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
             cfg_scale: float = PICTURE_CFG_SCALE, sampler: str = "ddpm", eta: float = 0.0) -> jax.Array:
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
    labels = check_sample_labels(labels, model.num_classes)
    engine = create_image_sampler(model, diffusion, cfg_scale=cfg_scale, sampler=sampler, eta=eta, vae=vae,
                                  per_device_batch=per_device_batch, mesh=mesh)
    progress = console.ProgressLog(f"sampling ({len(diffusion.timestep_map)} {sampler} steps a block)", len(labels),
                                   "images")
    blocks = []
    for block in iterate_blocks(engine, labels, seed=seed):
        blocks.append(block.images)
        progress.update(len(block.images))
    return np.concatenate(blocks)
