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
