"""Photo-like images and ImageFolder trees with the odd files a real dataset has (greyscale, alpha, CMYK,
corrupt, truncated, ignored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
    for key in IGNORED:  # never read: each is listed with its reason (a hidden folder gets an image inside)
        path = root / (key + "img0.JPEG" if key.endswith("/") else key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(whole)
    return root


# Entries of the tree that are not read (a GIF, a file outside the class folders, a hidden file and
# folder) and the start of the reason each is listed with.
IGNORED = {"n01/anim.gif": ".gif: not an image extension", "README.JPEG": "not in a class folder",
           "n03/._img0.JPEG": "hidden file", "n02/.thumbs/": "hidden folder"}


def make_flat_folder(root: Path, count: int = 3) -> Path:
    """A folder of ``count`` small PNG images (one class)."""
    from PIL import Image

    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(natural_image(np.random.default_rng(i), 20, 24)).save(root / f"{i}.png")
    return root
