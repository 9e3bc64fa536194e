"""Shared fixtures: the official PyTorch DiT reference data and NCHW -> NHWC conversion.

The session simulates 8 CPU devices (for the sharding tests); it must be set before jax is
imported, and a device count already in the user's ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from dit_jax import parity

# The official code's reference vectors, kept in the repository so that a clone tests itself
# (tests/data/README.md says what each file is and where it came from).
REFERENCE_DIR = Path(__file__).resolve().parent / "data"


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


def set_field(config: Any, field: str, value: Any) -> None:
    """``config.a.b.c = value`` for ``field="a.b.c"`` (a dotted path, as on the command line)."""
    *sections, key = field.split(".")
    for section in sections:
        config = config[section]
    config[key] = value


def flat_fields(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config overrides as dotted fields: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        out.update(flat_fields(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def read_log(workdir: Path, *, evals: bool = False) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``: the training lines, or (``evals``) the evaluation lines (``{"step", "eval", ...}``)."""
    import json

    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [h for h in lines if ("eval" in h) == evals]

# The sweep's base settings for a tiny DiT (``sweep.row_config``): 51k parameters, 8x8x4 inputs.
TINY_SWEEP_BASE = {"model": "DiT-S/2", "image_size": 64, "dtype": "float32",
                   "overrides": {"model.name": "", "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2,
                                 "model.input_size": 8, "model.num_classes": 10}}

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


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> Path:
    return make_image_tree(tmp_path_factory.mktemp("images") / "train")


def fake_features(images: np.ndarray, *, adm_sizes: bool = False) -> dict[str, np.ndarray]:
    """A cheap stand-in for the Inception features (the wiring is tested with it; the network in test_inception).

    16 pool, 12 spatial and 6 logit values from pixel statistics; ``adm_sizes``: the same values
    spread over the network's 2048 / 2023 / 1008 (what ``adm_npz.read_statistics`` checks).
    """
    x = images.astype(np.float64) / 255.0
    pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, ::4, ::4].reshape(len(x), -1)[:, :10]], 1)
    feats = {"pool": pool, "spatial": x[:, ::2, ::2, 0].reshape(len(x), -1)[:, :12], "logits": pool[:, :6] * 5}
    if adm_sizes:
        from dit_jax.fid import inception

        sizes = {"pool": inception.POOL_DIM, "spatial": inception.SPATIAL_DIM, "logits": inception.NUM_LOGITS}
        feats = {k: (np.resize(v.T, (sizes[k], len(v))).T * np.linspace(1, 2, sizes[k])).astype(np.float32)
                 for k, v in feats.items()}
    return feats


# ---------------------------------------------------------------- downloads (issue 12)

class FileServer(NamedTuple):
    """A loopback HTTP server over ``files`` (path -> bytes) that honours Range requests.

    ``requests`` records each request's (path, Range header); ``drop_after[path] = n`` makes
    the next request of ``path`` send ``n`` bytes of its body and then close the connection
    (once per entry: the entry is removed when used). ``headers[path]`` sets response headers
    of ``path`` (a value of None leaves the header out, e.g. ``Content-Length``).
    """

    url: str
    files: dict[str, bytes]
    requests: list[tuple[str, str | None]]
    drop_after: dict[str, int]
    headers: dict[str, dict[str, str | None]]


@pytest.fixture
def file_server():
    import http.server
    import threading

    files: dict[str, bytes] = {}
    requests: list[tuple[str, str | None]] = []
    drop_after: dict[str, int] = {}
    headers: dict[str, dict[str, str | None]] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.path, self.headers.get("Range")))
            if self.path not in files:
                self.send_error(404)
                return
            body, start = files[self.path], 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            for name, value in {"Content-Length": str(len(body) - start), **headers.get(self.path, {})}.items():
                if value is not None:
                    self.send_header(name, value)
            self.end_headers()
            cut = drop_after.pop(self.path, None)
            self.wfile.write(body[start:] if cut is None else body[start:start + cut])
            if cut is not None:
                self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FileServer(f"http://127.0.0.1:{server.server_address[1]}", files, requests, drop_after, headers)
    finally:
        server.shutdown()
        server.server_close()


def official_state(reference: Reference) -> dict[str, np.ndarray]:
    """The reference's official ``state_dict`` (``param/*`` arrays, official names and layouts)."""
    return {k[len("param/"):]: v for k, v in reference.arrays.items() if k.startswith("param/")}


def save_torch(path: Path, obj: Any) -> Path:
    """``torch.save`` of ``obj`` with numpy arrays (at any depth of dicts) turned into tensors."""
    import torch

    def tensors(x):
        if isinstance(x, dict):
            return {k: tensors(v) for k, v in x.items()}
        return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

    torch.save(tensors(obj), path)
    return path


# A 1-block pixel-space DiT on 32x32 synthetic images with 8x8 patches: its run takes seconds.
TINY_RUN = dict(model=dict(hidden_size=32, depth=1, num_heads=2, num_classes=4, mlp_ratio=4.0, patch_size=8),
                data=dict(num_train=64),
                train=dict(batch_size=8, log_every=1, checkpoint_every=2, max_to_keep=3, steps=3),
                evals=dict(samples=dict(per_class=1, num_classes=2, respacing="2"), class_consistency=dict(every=-1)))


def tiny_run_config(**sections: dict[str, Any]):
    """The demo config made tiny (``TINY_RUN``), with ``sections`` (e.g. ``train={...}``) updated on top."""
    from configs import default

    c = default.get_config()
    for field, value in [*flat_fields(TINY_RUN).items(), *flat_fields(sections).items()]:
        set_field(c, field, value)
    return c


def write_checkpoints(workdir: Path, config, steps: tuple[int, ...], *, atomicity: str = "auto") -> dict[int, Any]:
    """Checkpoints of ``config``'s initial state at ``steps`` in ``workdir/checkpoints``, as a run writes them
    (``checkpointing.save``, committed as ``atomicity`` says), each step with its own EMA (the initial one
    plus a step-dependent shift) so the steps and the EMA are told apart from the raw parameters. Returns
    the states by step."""
    import jax

    from dit_jax import checkpointing, input_pipeline, train

    _, _, state = train.create_train_state(config)
    batches = input_pipeline.make_train_iterator(input_pipeline.create_source(config),
                                                 batch_size=config.train.batch_size, seed=config.seed)
    manager = checkpointing.create_manager(str(workdir / "checkpoints"), every_steps=1, max_to_keep=10,
                                           atomicity=atomicity)
    states = {}
    try:
        for step in steps:
            states[step] = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32),
                                         ema_params=jax.tree.map(lambda p, s=step: p + 0.01 * s, state.params))
            checkpointing.save(manager, step, states[step], batches, config, force=True,
                               checksums=checkpointing.fingerprint(states[step])[0])
            manager.wait_until_finished()
    finally:
        manager.close()
    return states


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> Path:
    """A workdir of ``tiny_run_config()`` with checkpoints at steps 2 and 3 (``write_checkpoints``)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    write_checkpoints(workdir, tiny_run_config(), (2, 3))
    return workdir


TINY_DIFFUSERS_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)


def tiny_torch_dit(seed: int = 0, *, shared_embedders: bool = True):
    """A small random diffusers ``DiTTransformer2DModel`` (weights perturbed so none is a trivial 0 or 1).

    ``shared_embedders``: every block's timestep/label embedder equal to block 0's, as in a
    model converted from the official DiT (which has one of each).
    """
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**TINY_DIFFUSERS_DIT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if shared_embedders:
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


@pytest.fixture(scope="session")
def tiny_latents_dir(image_tree, tiny_vae_dir, tmp_path_factory) -> Path:
    """``image_tree`` (3 classes) encoded at 16x16 by the tiny VAE into 8x8x4 latents; the metadata names the VAE's folder."""
    from dit_jax import extract_latents, images, vae

    out = tmp_path_factory.mktemp("tiny_latents")
    extract_latents.extract(images.FolderSource(str(image_tree)), vae.load_vae(str(tiny_vae_dir)), str(out),
                            vae=str(tiny_vae_dir), resolution=16, images_per_shard=16, batch_size=8)
    return out


def latent_config(latents_dir: str):
    """The demo recipe on 8x8x4 latents (3 classes) with a 1-block DiT, 6 steps; no evaluations."""
    from configs import default

    c = default.get_config()
    c.model.update(hidden_size=32, depth=1, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=3,
                   guidance="official")
    c.data.update(source="latents", latents_dir=latents_dir)
    c.train.update(steps=6, batch_size=8, log_every=3)
    c.evals.samples.every = -1
    c.evals.class_consistency.every = -1
    return c


# ---------------------------------------------------------------- sampling (issue 12)

# A tiny latent-space DiT (4 channels, as the SD VAE's latents) with label dropout (a null label).
TINY_LATENT_DIT = dict(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)


def tiny_latent_dit(seed: int = 0):
    """``TINY_LATENT_DIT`` with every weight random (no zeroed output layer), so samples depend on labels and noise."""
    import jax
    from flax import nnx

    from dit_jax.models import DiT

    model = DiT(**TINY_LATENT_DIT, rngs=nnx.Rngs(seed))
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        var[...] = 0.05 * jax.random.normal(jax.random.key(1000 * seed + i), var[...].shape)
    return model


def write_official_checkpoint(path: Path, model) -> Path:
    """``model``'s weights as an official-format ``.pt`` (a plain state dict of torch tensors, as the release)."""
    from dit_jax.weights import convert

    return save_torch(path, {k: np.array(v) for k, v in convert.to_official_state_dict(model).items()})


@contextlib.contextmanager
def persistent_compile_cache(directory: Path) -> Iterator[dict[str, str]]:
    """JAX's persistent compilation cache in ``directory`` for every compile (also for subprocesses given the
    returned environment), restoring the previous settings after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")
    values = (str(directory), 0, 0)
    saved = [getattr(jax.config, name) for name in options]
    for name, value in zip(options, values):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield {name.upper(): str(value) for name, value in zip(options, values)}
    finally:
        for name, value in zip(options, saved):
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def sample_command(*args: str) -> list[str]:
    """``python -m dit_jax.sample ARGS`` with this interpreter."""
    return [sys.executable, "-m", "dit_jax.sample", *args]


def execute_notebook(notebook: Path, out_dir: Path, **parameters: Any):
    """Run ``notebook`` with papermill (parameters injected after its ``parameters`` cell) in a fresh
    ``python3`` kernel working in ``out_dir``, which inherits this environment; returns the executed notebook."""
    import nbformat
    import papermill

    out = out_dir / notebook.name
    papermill.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name="python3",
                               cwd=str(out_dir), progress_bar=False, execution_timeout=600)
    return nbformat.read(out, as_version=4)


# ---------------------------------------------------------------- FID InceptionV3 (issue 16)

def torch_fidelity_inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3`` without running the package's ``__init__``
    (which imports torchvision, which does not import beside this torch)."""
    import importlib
    import importlib.util
    import sys
    import types

    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def random_inception_state_dict(seed: int = 0) -> dict[str, Any]:
    """Random FID-InceptionV3 weights in the files' names (torch tensors), BatchNorm statistics
    calibrated on natural-looking images so every layer's activations stay healthy (not dead, not huge)."""
    import torch

    from dit_jax.fid.inception import expected_weights

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_weights().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            state[name] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif name.endswith("bn.weight"):
            state[name] = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen) + (0.2 if "bn" in name else 0.0)
        elif name.endswith("running_mean"):
            state[name] = torch.zeros(shape)
        else:
            state[name] = torch.ones(shape)
    # Calibrate: a pre-hook on every BatchNorm sets its statistics from its input, in one pass.
    model = _inception_torch_module(state)
    hooks = []
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            def hook(bn, args):
                x = args[0].double()
                bn.running_mean.copy_(x.mean(dim=(0, 2, 3)).float())
                bn.running_var.copy_(x.var(dim=(0, 2, 3)).float() + 1e-2)
            hooks.append(module.register_forward_pre_hook(hook))
    rng = np.random.default_rng(seed)
    images = np.stack([natural_image(rng, 96, 96) for _ in range(3)])
    with torch.no_grad():
        model(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    for h in hooks:
        h.remove()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in state}


def _inception_torch_module(state: dict[str, Any], dtype: str = "float32"):
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pth"
        torch.save(state, path)
        model = torch_fidelity_inception_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                                 feature_extractor_weights_path=str(path))
    if dtype == "float64":  # its own float64 option maps to float32 (torch-fidelity 0.4.0's text_to_dtype)
        model = model.double()
        model.feature_extractor_internal_dtype = torch.float64
    return model


def torch_fidelity_features(state: dict[str, Any], images: np.ndarray, dtype: str = "float32") -> dict[str, np.ndarray]:
    """torch-fidelity's pool_3 and bias-free logits, plus Mixed_6d's and Mixed_6e's 1x1 branches (NCHW)."""
    import torch

    model = _inception_torch_module(state, dtype)
    taps = {}
    for block in ("Mixed_6d", "Mixed_6e"):
        getattr(model, block).branch1x1.register_forward_hook(
            lambda m, a, out, block=block: taps.__setitem__(block, out.double().numpy()))
    with torch.no_grad():
        pool, logits = model(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).contiguous())
    return {"pool": pool.double().numpy(), "logits": logits.double().numpy(), **taps}


@pytest.fixture(scope="session")
def inception_state() -> dict[str, Any]:
    return random_inception_state_dict()


# ---------------------------------------------------------------- launch/ on a fake Cloud TPU (issue 13)

LAUNCH_DIR = Path(__file__).resolve().parents[1] / "launch"


class FakeGcloud:
    """``tests/fake_gcloud.py`` installed as ``gcloud`` first on ``PATH``, with its state and call log.

    ``run(script, *args)`` runs ``launch/<script>`` against it; ``calls()`` are the argument lists
    it received (each after ``gcloud``), ``state`` its project (see ``fake_gcloud.py``).
    """

    def __init__(self, root: Path, **state: Any):
        import sys

        self.root, self.bin = root, root / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.log, self.state_path = root / "gcloud_calls.jsonl", root / "gcloud_state.json"
        self.log.write_text("")
        self.state = {"qr": {}, "node": {}, **state}
        shim = self.bin / "gcloud"
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / 'fake_gcloud.py'} \"$@\"\n")
        shim.chmod(0o755)

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text())

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        self.state_path.write_text(json.dumps(value))

    def update(self, **changes: Any) -> None:
        self.state = {**self.state, **changes}

    def env(self, **extra: str) -> dict[str, str]:
        # Not DIT_TPU_* (the scripts' flags), nor what importing jax here set (no TPU chips: skip the metadata).
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIT_TPU_") and k != "TPU_SKIP_MDS_QUERY"}
        env.update(PATH=f"{self.bin}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log),
                   FAKE_GCLOUD_STATE=str(self.state_path), DIT_TPU_POLL="0", DIT_TPU_LOG_DIR=str(self.root / "logs"))
        env.update(extra)
        return env

    def run(self, script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        import subprocess

        return subprocess.run(["bash", str(LAUNCH_DIR / script), *args], cwd=self.root, env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def clear(self) -> None:
        self.log.write_text("")


@pytest.fixture
def fake_gcloud(tmp_path) -> FakeGcloud:
    return FakeGcloud(tmp_path / "fake_gcloud")


class FakeMetadataServer:
    """A GCE metadata server on 127.0.0.1 answering ``/computeMetadata/v1/instance/attributes/<key>``
    (what JAX's TPU-VM cluster detection reads; point it here with ``GCE_METADATA_IP=self.address``)."""

    def __init__(self, attributes: dict[str, str]):
        import http.server
        import threading

        prefix = "/computeMetadata/v1/instance/attributes/"

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                key = self.path[len(prefix):] if self.path.startswith(prefix) else None
                ok = key in attributes and self.headers.get("Metadata-Flavor") == "Google"
                body = (attributes[key] if ok else "not found").encode()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tpu_vm_metadata(worker: int, num_workers: int, accelerator: str = "v4-16") -> dict[str, str]:
    """The metadata attributes a TPU VM worker of a ``gcloud compute tpus`` slice has (as JAX reads them)."""
    endpoints = ",".join(f"unknown:{i}:127.0.0.1" for i in range(num_workers))  # name:id:ip triples
    env = f"ACCELERATOR_TYPE: '{accelerator}'\nWORKER_ID: '{worker}'\nZONE: 'fake-zone'\n"
    return {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints, "tpu-env": env}


def fake_tpu_chips(root: Path, chips: int = 4) -> list[str] | None:
    """A command prefix that runs a command where ``/sys/bus/pci/devices`` also lists ``chips`` TPU v4
    chips (Google's PCI vendor id and the v4 device id, as JAX's hardware probe reads them), in a user
    and mount namespace; None where unprivileged namespaces are not allowed."""
    import subprocess

    root.mkdir(parents=True, exist_ok=True)
    real = Path("/sys/bus/pci/devices")
    for entry in real.iterdir() if real.exists() else []:  # the machine's own devices stay (gloo reads its NIC's)
        (root / entry.name).symlink_to(entry.resolve())
    for i in range(chips):
        device = root / f"fffe:00:{i:02x}.0"  # a PCI domain no real device uses
        device.mkdir(parents=True, exist_ok=True)
        (device / "vendor").write_text("0x1ae0\n")
        (device / "device").write_text("0x005e\n")
        (device / "class").write_text("0x120000\n")  # a processing accelerator (gloo reads every device's class)
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c",
              f'mount --bind "{root}" /sys/bus/pci/devices && exec "$@"', "fake-tpu-vm"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else None


def fake_worker_tools(bin_dir: Path, python: str) -> Path:
    """Offline stand-ins on a fake worker's PATH for what setup fetches from the network: ``uv``
    (``uv venv DIR`` makes DIR/bin/python run ``python``; ``uv pip ...`` only records its arguments
    in ``~/uv_calls``) and ``gcsfuse`` / ``mountpoint`` (a mount is a ``.mounted`` marker file)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {
        "uv": f"""#!/bin/sh
echo "$*" >> "$HOME/uv_calls"
if [ "$1" = venv ]; then
    for last in "$@"; do :; done
    mkdir -p "$last/bin" && printf '#!/bin/sh\\nexec {python} "$@"\\n' > "$last/bin/python" && chmod +x "$last/bin/python"
fi
""",
        "gcsfuse": '#!/bin/sh\necho "$*" >> "$HOME/gcsfuse_calls"; for last in "$@"; do :; done; touch "$last/.mounted"\n',
        "mountpoint": '#!/bin/sh\nfor last in "$@"; do :; done; [ -e "$last/.mounted" ]\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


# ---------------------------------------------------------------- gs:// workdirs on a local GCS (issue 13)

GOOGLE_API_HOSTS = ("storage.googleapis.com", "www.googleapis.com", "oauth2.googleapis.com")


class FakeGcs(NamedTuple):
    """A GCS emulator (``gcp-storage-emulator``, in memory) on loopback with one bucket, and what a process
    needs to use it instead of Google: ``env`` (set it in a subprocess, or with ``monkeypatch``).

    Each client of the run reaches it its own way: google-cloud-storage (Orbax, the lock) through
    ``STORAGE_EMULATOR_HOST``, array_record (google-cloud-cpp) through ``CLOUD_STORAGE_EMULATOR_ENDPOINT``;
    TensorFlow's GCS filesystem (epath, TensorBoard) and TensorStore (Orbax's arrays) have no emulator
    setting, so they go through an HTTPS proxy on loopback that serves ``*.googleapis.com`` with a
    certificate of a test CA (``CURL_CA_BUNDLE``, ``TENSORSTORE_CA_BUNDLE``) and forwards to the emulator.
    The proxy refuses every other host, and the metadata server points at a closed port: nothing
    leaves the machine.
    """

    bucket: str
    env: dict[str, str]

    def url(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])


def _patch_emulator() -> None:
    """Three behaviours of real GCS that gcp-storage-emulator 2026.7.19 lacks, which the clients rely on:
    an empty upload is an empty object (it reads the missing body as None and fails), an upload with
    ``ifGenerationMatch=0`` fails with 412 if the object exists (it ignores the precondition), and a
    download names the object's generation in ``x-goog-generation`` (TensorStore reads it after a 412)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_dit_jax_patched", False):
        return
    read_data = server._read_data

    def _read_data(handler, query):
        data = read_data(handler, query)
        return b"" if data is None and (handler.command == "PUT" or query.get("uploadType") == ["media"]) else data

    def _precondition(handler):
        def checked(request, response, storage, *args, **kwargs):
            name = request.query.get("name", [None])[0]
            if name is None and request.query.get("uploadType") == ["multipart"]:
                name = request.data["meta"].get("name")
            if request.query.get("ifGenerationMatch") == ["0"] and name is not None:
                try:
                    storage.get_file_obj(request.params["bucket_name"], name)
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    return None
                except NotFound:
                    pass
            return handler(request, response, storage, *args, **kwargs)
        checked.__wrapped__ = handler
        return checked

    download = objects.download

    def _download(request, response, storage, *args, **kwargs):
        result = download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return result

    server._read_data = _read_data
    objects.download = _download  # objects.get calls it for ?alt=media
    insert = _precondition(objects.insert)
    patched = {download: _download, insert.__wrapped__: insert}
    server.HANDLERS = tuple((regex, {m: patched.get(h, h) for m, h in handlers.items()})
                           for regex, handlers in server.HANDLERS)
    server._dit_jax_patched = True


def serve_fake_gcs(root: str) -> None:
    """Run the emulator and the proxy (``FakeGcs``), print the environment that reaches them as one JSON line,
    and serve until stdin closes. A process of its own: TensorFlow's GCS calls hold the GIL while they wait
    for an answer, so a proxy in the process making them could never answer."""
    import http.client
    import http.server
    import logging
    import socket
    import socketserver
    import ssl
    import threading
    import urllib.parse

    import trustme
    from gcp_storage_emulator.server import create_server

    _patch_emulator()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    root = Path(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emulator = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    emulator.start()

    def forward(handler: http.server.BaseHTTPRequestHandler, host: str) -> None:
        """Send the request to the emulator and its answer back (Location headers kept on ``host``)."""
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(handler.rfile.readline().split(b";")[0], 16):
                body += handler.rfile.read(size)
                handler.rfile.readline()
            while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
        else:
            body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "proxy-connection", "expect")}
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                handler.send_header(key, value.replace(f"http://{host}", f"https://{host}")
                                    if key.lower() == "location" and host else value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    class Tunnel(http.server.BaseHTTPRequestHandler):
        """Requests inside a CONNECT tunnel to ``host``, after the TLS handshake."""
        protocol_version, host = "HTTP/1.1", ""

        def relay(self):
            forward(self, self.host)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = relay

        def log_message(self, *args):
            pass

    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*GOOGLE_API_HOSTS).configure_cert(context)

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_CONNECT(self):
            host = self.path.rsplit(":", 1)[0]
            if host not in GOOGLE_API_HOSTS:
                self.send_error(403, f"fake GCS proxy: refusing a tunnel to {self.path}")
                return
            self.send_response(200, "Connection established")
            self.end_headers()
            self.wfile.flush()
            type("Tunnel", (Tunnel,), {"host": host})(context.wrap_socket(self.connection, server_side=True),
                                                      self.client_address, self.server)
            self.close_connection = True

        def plain(self):
            """A plain-HTTP proxy request: served only if it is for the emulator itself."""
            url = urllib.parse.urlsplit(self.path)
            if (url.hostname, url.port) != ("127.0.0.1", port):
                self.send_error(403, f"fake GCS proxy: refusing {self.command} {self.path}")
                return
            self.path = url.path + (f"?{url.query}" if url.query else "")
            forward(self, "")

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = plain

        def log_message(self, *args):
            pass

    proxy = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Proxy)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    (root / "gcloud").mkdir()
    proxy_url, emulator_url = f"http://127.0.0.1:{proxy.server_address[1]}", f"http://127.0.0.1:{port}"
    env = {"https_proxy": proxy_url, "HTTPS_PROXY": proxy_url, "http_proxy": proxy_url, "HTTP_PROXY": proxy_url,
           "no_proxy": "", "NO_PROXY": "", "CURL_CA_BUNDLE": str(ca_file), "TENSORSTORE_CA_BUNDLE": str(ca_file),
           # No credentials: TensorFlow skips the metadata server and sends no token, TensorStore a fake one;
           # the emulator clients need none. No gcloud configuration of the user's is read.
           "NO_GCE_CHECK": "true", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "CLOUDSDK_CONFIG": str(root / "gcloud"),
           "GCE_METADATA_ROOT": "127.0.0.1:9", "GCE_METADATA_HOST": "127.0.0.1:9",
           "STORAGE_EMULATOR_HOST": emulator_url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": emulator_url}
    print(json.dumps(env), flush=True)
    try:
        sys.stdin.read()  # until the test session closes it
    finally:
        proxy.shutdown()
        proxy.server_close()
        emulator.stop()


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory) -> Iterator[FakeGcs]:
    import subprocess

    root = tmp_path_factory.mktemp("fake_gcs")
    server = subprocess.Popen([sys.executable, "-c", f"from tests.conftest import serve_fake_gcs; "
                               f"serve_fake_gcs({str(root)!r})"], cwd=Path(__file__).resolve().parents[1],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line, f"the fake GCS server did not start (exit status {server.wait()})"
        yield FakeGcs("bucket", json.loads(line))
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def gcs(fake_gcs, monkeypatch) -> FakeGcs:
    """``fake_gcs`` for this process: its environment set for the test (and inherited by its subprocesses),
    without the user's own credentials."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    for key, value in fake_gcs.env.items():
        monkeypatch.setenv(key, value)
    return fake_gcs
# ---------------------------------------------------------------- runs shared by several test files

ROOT = Path(__file__).resolve().parents[1]

TINY_FLAGS = ["--config.model.hidden_size=32", "--config.model.depth=1", "--config.model.num_heads=2",
              "--config.model.input_size=16", "--config.model.num_classes=3", "--config.data.image_size=16",
              "--config.data.num_train=128", "--config.train.log_every=2", "--config.evals.samples.respacing=3",
              "--config.evals.class_consistency.every=-1"]


def tiny_train_config():
    """The default recipe shrunk to seconds: 16x16 images, a 1-block DiT, 80 steps."""
    from configs import default

    c = default.get_config()
    c.model.update(hidden_size=32, depth=1, num_heads=2, patch_size=4, input_size=16, num_classes=4)
    c.data.update(num_train=256, image_size=16)
    c.train.update(steps=80, batch_size=16, lr=1e-3, log_every=5)
    c.evals.samples.update(per_class=2, respacing="5")
    c.evals.class_consistency.every = -1  # off
    return c


BENCHMARK_BATCH = 8
BENCHMARK_MESH = {"data": 4, "fsdp": 2, "tensor": 1}  # the 8 CPU devices simulated above


def tiny_benchmark_config():
    """The benchmark's base recipe with a 1-block DiT on 8x8x4 inputs over the 8 simulated devices."""
    from dit_jax.recipes import base_config

    c = base_config()
    c.model.name = ""
    c.model.update(patch_size=2, hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=10)
    c.train.batch_size = BENCHMARK_BATCH
    c.mesh.update(BENCHMARK_MESH)
    return c


def main_command(workdir, *flags: str) -> list[str]:
    """``python -m dit_jax.main`` on configs/default.py writing to ``workdir``, with ``flags`` added."""
    return [sys.executable, "-m", "dit_jax.main", "--config", "configs/default.py", "--workdir", str(workdir), *flags]


def tensorboard_steps(workdir) -> dict[str, list[int]]:
    """Each tag in the run's TensorBoard event files, with the steps it was written at."""
    from tensorboard.backend.event_processing import event_accumulator

    tags: dict[str, list[int]] = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.TENSORS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            tags.setdefault(tag, []).extend(event.step for event in accumulator.Tensors(tag))
    return tags


def run_processes(commands: list[list[str]], *, timeout: float) -> list[str]:
    """Each command as a process on 4 simulated CPU devices (a host of a multi-host run), all at
    once; their standard outputs once all exit 0. None outlives the call (the partner of a failed
    process would wait for it)."""
    import subprocess

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for command in commands]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def free_port() -> str:
    """A localhost TCP port nothing listens on now: the coordinator of a multi-process test."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


LATENT_SCALE = 0.5  # the scale factor ``write_latents`` records


def write_latents(folder, n: int, *, std: float, per_shard: int = 40, shape=(2, 2, 4)) -> str:
    """A latents folder whose record i has mean +(i+1) (view 0) / -(i+1) (flipped view) and the given std."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from dit_jax import extract_latents, latents

    shards = []
    count = -(-n // per_shard)
    for s in range(count):
        name = latents.shard_name(s, count)
        writer = ArrayRecordWriter(str(folder / name), extract_latents.WRITER_OPTIONS)
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            mean = np.stack([np.full(shape, i + 1.0), np.full(shape, -(i + 1.0))])
            writer.write(latents.encode_record(i % 4, mean, np.full_like(mean, std), "float16"))
        writer.close()
        shards.append({"file": name, "num_records": min(n, (s + 1) * per_shard) - s * per_shard})
    metadata = {"latent_shape": list(shape), "dtype": "float16", "scale_factor": LATENT_SCALE, "resolution": 16,
                "num_images": n, "counts_per_class": [n // 4] * 4, "shards": shards}
    (folder / latents.METADATA).write_text(json.dumps(metadata))
    return str(folder)
