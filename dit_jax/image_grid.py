"""Image grids as PNG files."""

from __future__ import annotations

import numpy as np
from PIL import Image


def save_grid(path: str, rows: np.ndarray, *, pad: int = 2, scale: int = 2) -> None:
    """Write uint8 images [rows, cols, H, W, C] as one PNG grid, upscaled ``scale``x (nearest)."""
    if rows.ndim != 5 or rows.dtype != np.uint8:
        raise ValueError(f"expected uint8 [rows, cols, H, W, C], got {rows.dtype} {rows.shape}")
    r, c, h, w, ch = rows.shape
    grid = np.full((r * (h + pad) + pad, c * (w + pad) + pad, ch), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = rows[i, j]
    image = Image.fromarray(grid.squeeze(-1) if ch == 1 else grid)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
