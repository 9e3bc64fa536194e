"""Pixel conversions (uint8 images to and from the model's [-1, 1] range), and image grids as arrays and PNG files."""

from __future__ import annotations

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dit_jax import storage


def to_uint8(x: jax.Array) -> jax.Array:
    """Model-range images (about [-1, 1]) -> uint8 as the official ``sample_ddp.py`` converts them.

    ``clamp(127.5 x + 128, 0, 255)`` then truncation, which is what ADM's reference batches
    and the published FIDs were computed on (not the rounding of ``from_model_range``).
    """
    return jnp.clip(127.5 * x + 128.0, 0.0, 255.0).astype(jnp.uint8)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """Map uint8 images in [0, 255] to float32 in [-1, 1] (the diffusion model's range)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"to_model_range expects uint8 images, got dtype {images.dtype}")
    return images.astype(np.float32) / 127.5 - 1.0


def from_model_range(x: np.ndarray) -> np.ndarray:
    """Map model outputs in [-1, 1] back to uint8 images (clipped, rounded)."""
    x = np.asarray(x, dtype=np.float32)
    return np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def make_grid(rows: np.ndarray, *, pad: int = 2, scale: int = 2) -> np.ndarray:
    """uint8 images [rows, cols, H, W, C] -> one uint8 [H', W', C] grid on white, upscaled ``scale``x (nearest)."""
    if rows.ndim != 5 or rows.dtype != np.uint8:
        raise ValueError(f"expected uint8 [rows, cols, H, W, C], got {rows.dtype} {rows.shape}")
    r, c, h, w, ch = rows.shape
    grid = np.full((r * (h + pad) + pad, c * (w + pad) + pad, ch), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = rows[i, j]
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_image(path: storage.PathLike, image: np.ndarray) -> None:
    """Write a uint8 [H, W, C] image (C = 1 or 3) in the format of ``path``'s extension (a PNG), locally or in
    a bucket; a kill leaves the old file or the new one (``storage.write_atomic``)."""
    encoded = io.BytesIO()
    image_format = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower(), "PNG")
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(encoded, format=image_format)
    storage.write_atomic(path, encoded.getvalue())


def save_grid(path: storage.PathLike, rows: np.ndarray, *, pad: int = 2, scale: int = 2) -> None:
    """Write uint8 images [rows, cols, H, W, C] as one PNG grid (``make_grid``)."""
    save_image(path, make_grid(rows, pad=pad, scale=scale))
