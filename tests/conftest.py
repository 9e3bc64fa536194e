"""Shared fixtures: the official PyTorch DiT reference data and NCHW -> NHWC conversion.

The session simulates 8 CPU devices (for the sharding tests); it must be set before jax is
imported, and a device count already in the user's ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from dit_jax import parity

# shared/ sits beside the repository checkout (see shared/reference/README.md).
REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


class Reference(NamedTuple):
    """Arrays produced by the official code (NCHW) and the tiny model's config."""

    arrays: dict[str, np.ndarray]
    config: dict[str, Any]


@pytest.fixture(scope="session")
def reference() -> Reference:
    """``dit_official_tiny.npz`` and the model config in ``dit_official_tiny.json``."""
    return Reference(*parity.load_reference(str(REFERENCE_DIR / "dit_official_tiny.npz")))


@pytest.fixture(scope="session")
def nhwc() -> Callable[[np.ndarray], np.ndarray]:
    """Converts a PyTorch NCHW array to this project's NHWC layout."""
    return lambda a: np.asarray(parity.nhwc(np.asarray(a)))


# ---------------------------------------------------------------- VAE / image tree / latents (issue 4)

TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=32)


def tiny_torch_vae(seed: int = 0):
    """A small random diffusers AutoencoderKL (perturbed so no weight is a trivial 0 or 1)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**TINY_VAE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """The tiny VAE saved as diffusers does (config.json + diffusion_pytorch_model.safetensors)."""
    path = tmp_path_factory.mktemp("tiny_vae")
    tiny_torch_vae().save_pretrained(path)
    return path


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour gradients, a few soft blobs, sensor noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([rng.uniform(0.2, 1) * (a * x + b * y) for a, b in rng.uniform(-1, 1, (3, 2))], -1)
    for _ in range(3):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        image += rng.uniform(-1, 1, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r ** 2)[..., None]
    image = (image - image.min()) / (np.ptp(image) + 1e-6) * 230 + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


# Bad or unusual files in the tree: (class folder, file name, what the extraction must do).
ODD_FILES = {"n01/grey.JPEG": "L", "n02/alpha.png": "RGBA", "n03/cmyk.jpg": "CMYK",
             "n02/corrupt.JPEG": "skip", "n03/truncated.JPEG": "skip"}


def make_image_tree(root: Path, per_class: int = 8, seed: int = 0) -> Path:
    """An ImageFolder tree ``root/n0{1,2,3}/*``: varied sizes and aspect ratios plus ``ODD_FILES``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in ("n01", "n02", "n03"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(18, 100, 2)
            Image.fromarray(natural_image(rng, h, w)).save(root / c / f"img{i}.JPEG", quality=90)
    Image.fromarray(natural_image(rng, 40, 52)[..., 0]).save(root / "n01/grey.JPEG")
    Image.fromarray(np.dstack([natural_image(rng, 44, 36), rng.integers(0, 255, (44, 36), np.uint8)])).save(
        root / "n02/alpha.png")
    Image.fromarray(natural_image(rng, 33, 61)).convert("CMYK").save(root / "n03/cmyk.jpg")
    (root / "n02/corrupt.JPEG").write_bytes(b"\xff\xd8 this is not a JPEG")
    whole = (root / "n01/img0.JPEG").read_bytes()
    (root / "n03/truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("images") / "train")
