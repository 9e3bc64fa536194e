"""Class-conditional synthetic image dataset for the CPU demo.

Each class is one simple, high-contrast shape drawn in its own base hue on a
dark, randomly tinted background, with per-example jitter of position, size and
colour plus mild pixel noise. The shapes are big and simple so that a small
pixel-space DiT can learn them within minutes on a CPU, and distinct enough
that a small CNN separates them almost perfectly (see ``dit_jax.classifier``).

Shapes are described as signed distance functions (SDFs) in coordinates
normalised by the shape's radius, which gives cheap anti-aliased edges and
keeps generation fully vectorised in numpy.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Sdf = Callable[[np.ndarray, np.ndarray], np.ndarray]

_CHUNK = 2048  # examples rasterised at once; bounds peak memory


def _box(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    """Approximate SDF of an axis-aligned box (exact inside and on edges)."""
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def _rotate45(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.float32(np.sqrt(0.5))
    return c * (u + v), c * (v - u)


def _stripes(t: np.ndarray) -> np.ndarray:
    """Two bold parallel stripes of half-width 0.3 centred at t = -0.5 and 0.5."""
    return np.abs(np.abs(t) - 0.5) - 0.3


def _disc(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 1.0


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _box(u, v, 0.8, 0.8)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Apex up (image v grows downwards): |u| <= (v + 0.95) / 2 for v <= 0.75.
    slant = (2.0 * np.abs(u) - v - 0.95) / np.sqrt(5.0)
    return np.maximum(slant, v - 0.75)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.28


def _plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0))


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _plus(*_rotate45(u, v))


def _hbars(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(_stripes(v), _box(u, v, 0.95, 0.95))


def _vbars(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(_stripes(u), _box(u, v, 0.95, 0.95))


def _checker(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # 2x2 checkerboard: the top-left and bottom-right cells.
    return np.minimum(_box(u + 0.45, v + 0.45, 0.45, 0.45), _box(u - 0.45, v - 0.45, 0.45, 0.45))


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    bite = np.sqrt((u - 0.55) ** 2 + (v + 0.25) ** 2) - 0.8
    return np.maximum(_disc(u, v), -bite)


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (np.abs(u) + np.abs(v) - 1.05) * np.float32(np.sqrt(0.5))


def _diagonal_stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    t, _ = _rotate45(u, v)
    return np.maximum(_stripes(t), _box(u, v, 0.85, 0.85))


_SHAPES: tuple[tuple[str, Sdf], ...] = (
    ("disc", _disc),
    ("square", _square),
    ("triangle", _triangle),
    ("ring", _ring),
    ("plus", _plus),
    ("cross", _cross),
    ("horizontal_bars", _hbars),
    ("vertical_bars", _vbars),
    ("checkerboard", _checker),
    ("crescent", _crescent),
    ("diamond", _diamond),
    ("diagonal_stripes", _diagonal_stripes),
)

CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in _SHAPES)
MAX_CLASSES: int = len(_SHAPES)
_MIN_IMAGE_SIZE = 16
# Jitter: shape radius as a fraction of the image size, and the largest shift of its centre
# from the middle (also a fraction of the size, +-2.5 px at 32x32). Enough variety that the
# model must generate rather than copy, little enough that a CPU-sized DiT learns every
# class's shape in minutes.
_RADIUS_RANGE = (0.31, 0.36)
_MAX_SHIFT = 0.08


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of shape [N]; returns [N, 3] in [0, 1]."""
    n = np.array([5.0, 3.0, 1.0], dtype=np.float32)
    k = (n + 6.0 * h[:, None]) % 6.0
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * ramp


def _rasterise(labels: np.ndarray, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Draw one shape per label; returns float32 images in [0, 1], [N, H, W, 3]."""
    n = labels.shape[0]
    size = float(image_size)
    f32 = np.float32

    radius = (rng.uniform(*_RADIUS_RANGE, n) * size).astype(f32)
    cx = (size * (0.5 + rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, n))).astype(f32)
    cy = (size * (0.5 + rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, n))).astype(f32)

    # A shape's base hue is fixed by its index, independent of num_classes.
    fg_hue = (labels / MAX_CLASSES + rng.uniform(-0.025, 0.025, n)) % 1.0
    fg = _hsv_to_rgb(
        fg_hue.astype(f32),
        rng.uniform(0.65, 1.0, n).astype(f32),
        rng.uniform(0.8, 1.0, n).astype(f32),
    )
    bg = _hsv_to_rgb(
        rng.uniform(0.0, 1.0, n).astype(f32),
        rng.uniform(0.2, 0.7, n).astype(f32),
        rng.uniform(0.05, 0.28, n).astype(f32),
    )
    noise = rng.standard_normal((n, image_size, image_size, 3), dtype=f32)

    pixel = np.arange(image_size, dtype=f32) + 0.5
    alpha = np.empty((n, image_size, image_size), dtype=f32)
    for cls, (_, sdf) in enumerate(_SHAPES):
        idx = np.flatnonzero(labels == cls)
        if idx.size == 0:
            continue
        r = radius[idx, None, None]
        u = (pixel[None, None, :] - cx[idx, None, None]) / r
        v = (pixel[None, :, None] - cy[idx, None, None]) / r
        # Coverage ~ fraction of the pixel inside the shape (1-pixel ramp).
        alpha[idx] = np.clip(0.5 - sdf(u, v) * r, 0.0, 1.0)

    a = alpha[..., None]
    images = bg[:, None, None, :] + (fg - bg)[:, None, None, :] * a
    images += 0.015 * noise
    return np.clip(images, 0.0, 1.0, out=images)


def make_examples(
    num_examples: int, *, num_classes: int = 10, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate a class-balanced, shuffled synthetic dataset.

    Returns ``(images, labels)``: uint8 ``[N, H, W, 3]`` (NHWC) and int32 ``[N]``.
    Labels cycle over the classes before shuffling, so class counts differ by at
    most one. Output is a deterministic function of the arguments.
    """
    if num_examples <= 0:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"num_classes must be between 2 and {MAX_CLASSES} (the number of shapes), "
            f"got {num_classes!r}"
        )
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size!r}")

    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    images = np.empty((num_examples, image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, num_examples, _CHUNK):
        chunk = _rasterise(labels[start : start + _CHUNK], rng, image_size)
        images[start : start + _CHUNK] = np.rint(chunk * 255.0).astype(np.uint8)
    return images, labels

