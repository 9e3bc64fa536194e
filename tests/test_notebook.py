"""The Colab sampling notebook (notebooks/sample_tpu.ipynb), its install script and requirements-sample.txt.

The notebook is executed with papermill in a fresh kernel on the CPU, offline, with a tiny
official-format checkpoint and a tiny diffusers VAE; its PNG must be the library's own sampling.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from dit_jax import diffusion as gd, imagenet_classes, sample, vae
from dit_jax.sampling import engine
from tests.processes import execute_notebook
from tests.tiny_models import tiny_latent_dit
from tests.torch_references import write_official_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "sample_tpu.ipynb"
INSTALL_SH = ROOT / "notebooks" / "install.sh"


def tags(cell) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def python_of(cell) -> str:
    """A code cell's source without its IPython cell magics (``%%time``)."""
    return "\n".join(line for line in cell.source.splitlines() if not line.startswith("%%"))


# ---------------------------------------------------------------- structure


def test_the_notebook_is_a_colab_tpu_notebook_without_outputs_whose_cells_call_the_library():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["accelerator"] == "TPU" and nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "stored outputs"
    # One parameters cell, first: papermill's parameters and Colab's form (every setting has an @param).
    params, install, rest = code[0], code[1], code[2:]
    assert [c for c in code if "parameters" in tags(c)] == [params] and tags(install) == ["install"]
    assignments = ast.parse(params.source).body
    assert assignments and all(isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) for s in assignments)
    for line in params.source.splitlines():
        if line and not line.startswith("#"):
            assert "  # @param" in line, line
    names = {s.targets[0].id for s in assignments}
    assert {"RESOLUTION", "VAE", "SEED", "NUM_SAMPLING_STEPS", "CFG_SCALE", "LABELS", "CKPT", "INSTALL"} <= names
    assert ast.parse(install.source).body[-1].test.id == "INSTALL"  # the install is skipped under INSTALL=False
    # The other cells import and call: no control flow or definitions, only functions of dit_jax, jax, IPython.
    modules: set[str] = set()
    for cell in rest:
        tree = ast.parse(python_of(cell))
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.If, ast.IfExp, ast.For, ast.While, ast.Try, ast.With, ast.FunctionDef,
                                         ast.Lambda, ast.ClassDef, ast.comprehension)), ast.unparse(node)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                root = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
                assert root in ("dit_jax", "jax", "IPython"), ast.unparse(node)
                modules |= {alias.asname or alias.name for alias in node.names}
        for statement in tree.body:
            assert isinstance(statement, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)), ast.unparse(statement)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                while isinstance(func, ast.Attribute):
                    func = func.value
                assert func.id in modules | {"print"}, ast.unparse(node)
    assert {"sample", "load_dit", "imagenet_classes"} <= modules
    called = {ast.unparse(n.func) for c in rest for n in ast.walk(ast.parse(python_of(c))) if isinstance(n, ast.Call)}
    assert {"load_dit", "sample.load_decoder", "sample.sample_picture"} <= called


def test_the_repository_url_is_a_form_field_that_must_be_set_before_installing(tmp_path, monkeypatch):
    """No placeholder organisation: REPO is a form field (default "", the install names it)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert "YOUR_GITHUB_ORG" not in NOTEBOOK.read_text()
    params, install = [c for c in nb.cells if c.cell_type == "code"][:2]
    assert 'REPO = ""  # @param {type:"string"}' in params.source.splitlines()
    monkeypatch.chdir(tmp_path)  # no dit_jax_src/ here: the install would clone REPO
    with pytest.raises(ValueError, match="set REPO in the options above to the repository's git URL"):
        exec(install.source, {"INSTALL": True, "REPO": "", "REF": "main"})
    assert list(tmp_path.iterdir()) == []


def requirement_lines(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    from packaging.requirements import Requirement

    return {Requirement(line).name.lower(): str(Requirement(line).specifier) for line in lines
            if line and not line.startswith("-r")}


def test_the_sampling_requirements_pin_as_the_project_and_leave_out_tensorflow():
    sampling, full = requirement_lines(ROOT / "requirements-sample.txt"), requirement_lines(ROOT / "requirements.txt")
    assert sampling["jax"] == full["jax"]  # jax[cpu]==X there, jax==X here (the extra is the runtime's)
    assert {name: spec for name, spec in sampling.items() if name in full} == {
        name: full[name] for name in sampling if name in full}
    assert not [name for name in sampling if name not in full], "a sampling requirement the project does not have"
    assert not {n for n in sampling if n.startswith(("tensorflow", "tensorboard", "clu", "torch", "diffusers"))}


BLOCKER = """
import importlib.abc, sys
BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorboard", "clu", "torch", "diffusers", "torch_fidelity")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not a sampling requirement")
sys.meta_path.insert(0, Block())
from dit_jax import imagenet_classes, sample, vae
from dit_jax.sampling import image_grid
from dit_jax.weights import load
"""


def test_the_notebooks_modules_import_without_tensorflow_or_pytorch():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------- install.sh


def fake_pci(root: Path, *devices: tuple[str, str]) -> Path:
    for i, (vendor, device) in enumerate(devices):
        folder = root / f"0000:00:{i + 4:02x}.0"
        folder.mkdir(parents=True)
        (folder / "vendor").write_text(vendor + "\n")
        (folder / "device").write_text(device + "\n")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize("pci, nvidia, extra", [
    ([("0x1ae0", "0x0063")], False, "tpu"),  # a v5e chip (Colab's v5e-1)
    ([("0x1ae0", "0x0042"), ("0x8086", "0x1237")], False, None),  # Google's virtual NIC is not a TPU
    ([("0x10de", "0x20b0")], True, "cuda12"),
    ([], False, None),
])
def test_install_picks_jax_for_the_runtimes_accelerator(tmp_path, pci, nvidia, extra):
    calls = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    python.chmod(0o755)
    dev = tmp_path / "dev"
    dev.mkdir()
    if nvidia:
        (dev / "nvidia0").touch()
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "PCI_DEVICES": str(fake_pci(tmp_path / "pci", *pci)),
           "DEV_DIR": str(dev)}
    proc = subprocess.run(["bash", str(INSTALL_SH), str(ROOT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pin = requirement_lines(ROOT / "requirements.txt")["jax"].removeprefix("==")
    first = f"-m pip install --quiet -r {ROOT}/requirements-sample.txt" + (f" jax[{extra}]=={pin}" if extra else "")
    assert calls.read_text().splitlines() == [first, f"-m pip install --quiet --no-deps {ROOT}"]
    assert f"installing for {extra or 'cpu'}" in proc.stderr


def test_install_takes_the_accelerator_from_the_environment_and_refuses_others(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho \"$*\"\n")
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "PCI_DEVICES": str(tmp_path), "DEV_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(INSTALL_SH)], env={**env, "DIT_JAX_ACCELERATOR": "tpu"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "jax[tpu]==" in proc.stdout.splitlines()[0], proc.stderr
    assert proc.stdout.splitlines()[1].endswith(f"--no-deps {ROOT}")  # default source: this checkout
    proc = subprocess.run(["bash", str(INSTALL_SH)], env={**env, "DIT_JAX_ACCELERATOR": "rocm"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "must be tpu, cuda12 or cpu, not 'rocm'" in proc.stderr and not proc.stdout


def test_install_script_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    proc = subprocess.run([str(shellcheck), str(INSTALL_SH)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------- class names


def test_imagenet_classes_are_tfds_synsets_with_readable_names():
    classes = imagenet_classes.imagenet_classes()
    tfds_labels = Path(__import__("tensorflow_datasets").__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
    assert [c.synset for c in classes] == tfds_labels.read_text().split()
    assert len({c.name for c in classes}) == 1000
    # The official sample.py's classes, as its comments name them.
    names = [classes[i].name for i in sample.OFFICIAL_LABELS]
    assert names == ["golden retriever", "otter", "lesser panda", "geyser", "macaw", "valley", "balloon",
                     "Arctic fox"]
    assert imagenet_classes.describe_labels([207, 0]).splitlines() == [" 207  n02099601  golden retriever",
                                                                       "   0  n01440764  tench"]
    assert "a 5-class model" in imagenet_classes.describe_labels([3], num_classes=5)


# ---------------------------------------------------------------- executed with papermill

STEPS, SEED, LABELS = 2, 3, [1, 2, 3, 4, 0]


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_latent_dit()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_model):
    return write_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-dit.pt", tiny_model)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """What the notebook's kernel inherits: offline, an empty cache, the CPU."""
    monkeypatch.setenv("DIT_JAX_OFFLINE", "1")
    monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def tiny_parameters(tiny_ckpt, tiny_vae_dir, tmp_path, **changes):
    # RESOLUTION 64: the tiny 8x8-latent model's size as the SD VAE would decode it (checked by load_dit).
    return {"INSTALL": False, "CKPT": str(tiny_ckpt), "NUM_HEADS": 2, "VAE": str(tiny_vae_dir), "RESOLUTION": 64,
            "NUM_SAMPLING_STEPS": STEPS, "SEED": SEED, "CFG_SCALE": 4.0, "LABELS": ", ".join(map(str, LABELS)),
            "PNG": str(tmp_path / "grid.png"), **changes}


@pytest.mark.slow  # compiles and runs the sampler in a fresh kernel (~1 min here); the failures below are fast
def test_the_notebook_writes_and_shows_the_librarys_picture(tmp_path, offline, tiny_model, tiny_ckpt, tiny_vae_dir):
    executed = execute_notebook(NOTEBOOK, tmp_path, **tiny_parameters(tiny_ckpt, tiny_vae_dir, tmp_path))
    # The library's own sampling: the engine with the labels' per-device batch (5 labels on 8 devices: 1).
    images = engine.sample_uint8(tiny_model, gd.create_diffusion(str(STEPS)), np.array(LABELS), seed=SEED,
                                 cfg_scale=4.0, vae=vae.load_vae(str(tiny_vae_dir)), per_device_batch=1)
    sample.save_picture_grid(str(tmp_path / "expected.png"), images)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")),
                                  np.asarray(Image.open(tmp_path / "expected.png")))
    assert (tmp_path / "grid.png").read_bytes() == (tmp_path / "expected.png").read_bytes()
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    shown = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1  # the grid, inline
    text = json.dumps([o.get("text", "") for o in outputs])
    assert "a 5-class model" in text and "Wall time" in text  # the labels described; load and sampling timed


@pytest.mark.slow  # a kernel that loads PyTorch for the .pt; the message itself: tests/test_sample.py
def test_the_notebook_shows_the_librarys_message_for_a_bad_label(tmp_path, offline, tiny_ckpt, tiny_vae_dir):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match=r"class indices in \[0, 4\].*got \[9\]"):
        execute_notebook(NOTEBOOK, tmp_path, **tiny_parameters(tiny_ckpt, tiny_vae_dir, tmp_path, LABELS="1, 9"))
    assert not (tmp_path / "grid.png").exists()


def test_the_notebook_fetches_the_released_weights_and_says_what_to_fetch_offline(tmp_path, offline):
    import papermill

    # CKPT "" = the released DiT-XL/2 for RESOLUTION, through the registry; offline, the error names it.
    with pytest.raises(papermill.PapermillExecutionError, match=r"DiT-XL-2-512x512\.pt.*offline"):
        execute_notebook(NOTEBOOK, tmp_path, INSTALL=False, CKPT="", RESOLUTION=512)
