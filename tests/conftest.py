"""Shared fixtures: the official PyTorch DiT reference data and NCHW -> NHWC conversion."""

from __future__ import annotations

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
