"""Pixel conversions between uint8 images and the model's [-1, 1] range (dit_jax.sampling.image_grid)."""

import numpy as np
import pytest

from dit_jax.sampling.image_grid import from_model_range, to_model_range


def test_model_range_round_trip():
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = to_model_range(pixels)
    assert x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    back = from_model_range(x)
    assert back.dtype == np.uint8 and np.array_equal(back, pixels)


def test_from_model_range_clips_and_rounds():
    out = from_model_range(np.array([-3.0, -1.0, 0.0, 0.999, 2.0]))
    assert out.tolist() == [0, 0, 128, 255, 255]


def test_to_model_range_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(np.zeros((1, 4, 4, 3), np.float32))
