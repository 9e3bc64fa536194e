"""The suite's fixtures; what they are built from lives in the helper modules beside this file, which the
tests import directly:

- ``torch_references``: the official DiT's reference vectors, tiny diffusers models, official checkpoints;
- ``inception_features``: torch-fidelity's FID network on random weights, and cheap fake features;
- ``fake_images``: photo-like images and ImageFolder trees with odd files;
- ``tiny_models``: tiny models and the configs, flags and recipes that run them in seconds;
- ``processes``: the commands' lines, processes on simulated devices, the notebook, the compile cache;
- ``run_files``: a run's log and events read back; checkpoints and latents folders written;
- ``file_server``: a loopback HTTP server for the downloads;
- ``fake_tpu_vm`` (with ``fake_gcloud.py``): a Cloud TPU for launch/ and JAX's TPU-VM detection;
- ``fake_gcs``: a local Google Cloud Storage for ``gs://`` runs.

The session simulates 8 CPU devices (for the sharding tests); it must be set before jax is
imported, and a device count already in the user's ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The helpers' asserts explain a failure as the tests' do (registered before they are imported).
pytest.register_assert_rewrite(*(f"tests.{name}" for name in (
    "fake_gcs", "fake_images", "fake_tpu_vm", "file_server", "inception_features", "processes", "run_files",
    "tiny_models", "torch_references")))

from dit_jax import parity
from tests.fake_gcs import FakeGcs, start_fake_gcs
from tests.fake_images import make_image_tree
from tests.fake_tpu_vm import FakeGcloud
from tests.file_server import FileServer, serve_files
from tests.inception_features import random_inception_state_dict
from tests.run_files import write_checkpoints
from tests.tiny_models import tiny_run_config
from tests.torch_references import REFERENCE_DIR, Reference, tiny_torch_vae


@pytest.fixture(scope="session")
def reference() -> Reference:
    """``dit_official_tiny.npz`` and the model config in ``dit_official_tiny.json``."""
    return Reference(*parity.load_reference(str(REFERENCE_DIR / "dit_official_tiny.npz")))


@pytest.fixture(scope="session")
def nhwc() -> Callable[[np.ndarray], np.ndarray]:
    """Converts a PyTorch NCHW array to this project's NHWC layout."""
    return lambda a: np.asarray(parity.nhwc(np.asarray(a)))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """The tiny VAE saved as diffusers does (config.json + diffusion_pytorch_model.safetensors)."""
    path = tmp_path_factory.mktemp("tiny_vae")
    tiny_torch_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A workdir of ``tiny_run_config()`` with checkpoints at steps 2 and 3 (``write_checkpoints``)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    write_checkpoints(workdir, tiny_run_config(), (2, 3))
    return workdir


@pytest.fixture(scope="session")
def tiny_latents_dir(image_tree, tiny_vae_dir, tmp_path_factory) -> Path:
    """``image_tree`` (3 classes) encoded at 16x16 by the tiny VAE into 8x8x4 latents; the metadata names the VAE's folder."""
    from dit_jax import images, latent_extraction, vae

    out = tmp_path_factory.mktemp("tiny_latents")
    latent_extraction.extract(images.FolderSource(str(image_tree)), vae.load_vae(str(tiny_vae_dir)), str(out),
                              vae=str(tiny_vae_dir), resolution=16, images_per_shard=16, batch_size=8)
    return out


@pytest.fixture(scope="session")
def inception_state() -> dict[str, Any]:
    return random_inception_state_dict()


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    with serve_files() as server:
        yield server


@pytest.fixture
def fake_gcloud(tmp_path) -> FakeGcloud:
    return FakeGcloud(tmp_path / "fake_gcloud")


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory) -> Iterator[FakeGcs]:
    with start_fake_gcs(tmp_path_factory.mktemp("fake_gcs")) as server:
        yield server


@pytest.fixture
def gcs(fake_gcs, monkeypatch) -> FakeGcs:
    """``fake_gcs`` for this process: its environment set for the test (and inherited by its subprocesses),
    without the user's own credentials."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    for key, value in fake_gcs.env.items():
        monkeypatch.setenv(key, value)
    return fake_gcs
