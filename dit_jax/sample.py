"""``python -m dit_jax.sample``: the official ``sample.py`` and ``sample_ddp.py`` over one engine (``dit_jax.sampling``).

Every sample ``j`` depends only on ``(seed, j)``, so 1 device, 8 devices and a resumed run give
the same bytes (``sampling.engine``); FID mode writes resumably into an ADM-format
``samples.npz`` (``sampling.blocks``).

Picture mode, the official ``sample.py`` (a PNG grid of the 8 official classes, guidance 4.0;
``sample_picture`` in a notebook)::

    python -m dit_jax.sample --ckpt DiT-XL-2-256x256.pt --png sample.png   # --vae mse, as sample.py

FID mode, the official ``sample_ddp.py`` made resumable (guidance 1.5, uniform random labels, ``--vae ema``;
``--out`` is locked, ``dit_jax.locking``)::

    python -m dit_jax.sample --ckpt DiT-XL-2-256x256.pt --num_samples 50000 --out samples/xl2_cfg1.5
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dit_jax import compilation_cache, console, diffusion as gd, locking, sharding, storage
from dit_jax.model_compute import ATTENTION_IMPLEMENTATIONS
from dit_jax.models import GUIDANCE_MODES, OFFICIAL_GUIDANCE_CHANNELS, DiT
from dit_jax.sampling.blocks import SAMPLES_NPZ, weights_digest, write_samples
from dit_jax.sampling.engine import (FID_CFG_SCALE, PICTURE_CFG_SCALE, SAMPLERS, balanced_labels, check_sample_labels,
                                     create_image_sampler, random_labels, sample_uint8)
from dit_jax.sampling.image_grid import save_grid
from dit_jax.weights import fetch
from dit_jax.weights.load import load_dit

# The official sample.py's classes: 207 golden retriever, 360 otter, 387 red panda, 974 geyser,
# 88 macaw, 979 valley, 417 balloon, 279 arctic fox.
OFFICIAL_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


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
                   cfg_scale: float = PICTURE_CFG_SCALE, num_sampling_steps: int = 250, sampler: str = "ddpm", eta: float = 0.0,
                   per_device_batch: int | None = None, png: str | None = None, mesh: Mesh | None = None) -> np.ndarray:
    """Picture mode (the official ``sample.py``): uint8 images [N, H, W, C] of ``labels``, and their grid in ``png``.

    ``labels``: class indices, or a string ``"207,360,..."`` (``parse_labels``). ``per_device_batch``
    ``None``: just enough samples per device for the labels in one program call (the bytes are
    those of ``sample_uint8`` with that per-device batch). The PNG (``save_picture_grid``, 4 a
    row) is written by process 0; every process returns the images.
    """
    labels = parse_labels(labels, model.num_classes) if isinstance(labels, str) else check_sample_labels(
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
    cfg_scale = cfg_scale if cfg_scale is not None else (FID_CFG_SCALE if fid_mode else PICTURE_CFG_SCALE)
    vae = vae if vae is not None else ("ema" if fid_mode else "mse")
    # Paths as typed (relative, ~, a trailing slash) resolved once here; names and hub ids stay as they are.
    ckpt = fetch.name_or_path(ckpt, tuple(fetch.REGISTRY))
    vae = fetch.name_or_path(vae, ("none", *HUB_VAES))
    png, out = (None if p is None else storage.absolute(p) for p in (png, out))

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
                "vae": vae,
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
    flags.DEFINE_float("cfg_scale", None, f"Classifier-free guidance scale; 1 = none (default {PICTURE_CFG_SCALE} for "
                       f"pictures, {FID_CFG_SCALE} for --num_samples, as the official sample.py / sample_ddp.py).")
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
        console.fail(str(err))
    except FloatingPointError as err:  # the run failed: one line, status 1
        console.fail(str(err), 1)
    if sharding.is_main_process():
        print(f"wrote {path}" if written else f"{path} is complete (same settings); nothing to do")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
