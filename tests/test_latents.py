"""The latent record format: exact round trips in both storage dtypes, clear errors for bad sizes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from dit_jax import latents


@pytest.mark.parametrize("dtype, numpy_dtype", [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_records_round_trip_in_each_storage_dtype(dtype, numpy_dtype):
    rng = np.random.default_rng(0)
    means, stds = rng.normal(size=(3, 2, 4, 4, 4)), rng.uniform(0.01, 1, (3, 2, 4, 4, 4))
    data = [latents.encode_record(label, m, s, dtype) for label, m, s in zip((7, 0, 999), means, stds)]
    assert len(data[0]) == latents.record_dtype((4, 4, 4), dtype).itemsize == 4 + 2 * 2 * 64 * 2
    records = latents.decode_records(data, (4, 4, 4), dtype)
    assert list(records["label"]) == [7, 0, 999]
    assert records["mean"].dtype == numpy_dtype
    np.testing.assert_array_equal(records["mean"], means.astype(numpy_dtype))
    np.testing.assert_array_equal(records["std"], stds.astype(numpy_dtype))


def test_records_of_another_shape_are_rejected():
    data = latents.encode_record(1, np.zeros((2, 4, 4, 4)), np.ones((2, 4, 4, 4)), "float16")
    with pytest.raises(ValueError, match="corrupt latent record: 516 bytes, expected 2052"):
        latents.decode_records([data], (8, 8, 4), "float16")
