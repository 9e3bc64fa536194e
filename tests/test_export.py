"""Export to the official PyTorch format and to diffusers, and the round trips back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from dit_jax import export, parity
from dit_jax.weights.load import load_dit
from tests.torch_references import official_state, save_torch, tiny_torch_dit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def official_pt(reference, tmp_path) -> Path:
    return save_torch(tmp_path / "tiny.pt", official_state(reference))


def forward_error(model, reference) -> float:
    a = reference.arrays
    out = model(parity.nhwc(a["x"]), a["t"], a["y"])
    return parity.relative_error(np.transpose(np.asarray(out), (0, 3, 1, 2)), a["forward"])


def test_official_round_trip_is_exact_and_reproduces_the_reference(reference, official_pt, tmp_path):
    import torch

    out = export.export(str(official_pt), tmp_path / "again.pt", num_heads=4)
    written = torch.load(out, map_location="cpu", weights_only=True)
    original = official_state(reference)
    assert list(written) == list(original)  # names and the official order
    for name, value in original.items():
        assert written[name].dtype == torch.float32 and written[name].is_contiguous()
        np.testing.assert_array_equal(written[name].numpy(), value, err_msg=name)
    assert forward_error(load_dit(str(out), num_heads=4).model, reference) < 1e-5


def test_official_export_without_torch_says_so_and_safetensors_needs_none(official_pt, tmp_path, monkeypatch):
    loaded = load_dit(str(official_pt), num_heads=4)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
        export.export_official(loaded, tmp_path / "x.pt")
    path = export.export_official(loaded, tmp_path / "x.safetensors")
    again = load_dit(str(path), num_heads=4)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loaded.model)), nnx.to_flat_state(nnx.state(again.model))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def test_diffusers_export_loads_in_diffusers_and_computes_our_forward(official_pt, tmp_path, caplog):
    import torch
    from diffusers import DiTTransformer2DModel

    loaded = load_dit(str(official_pt), num_heads=4)
    with caplog.at_level(logging.WARNING):
        folder = export.export_diffusers(loaded, tmp_path / "dit")
    [warning] = [r.getMessage() for r in caplog.records if "downscale_freq_shift" in r.getMessage()]
    assert "\n" not in warning and "use_official_timesteps" in warning
    theirs = DiTTransformer2DModel.from_pretrained(folder).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t, y = np.array([1, 50, 400, 999]), np.array([2, 0, 9, 10])

    def forward() -> np.ndarray:
        with torch.no_grad():
            return theirs(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy()), timestep=torch.from_numpy(t),
                          class_labels=torch.from_numpy(y)).sample.numpy()

    ours = np.transpose(np.asarray(loaded.model(x, t, y)), (0, 3, 1, 2))
    assert parity.relative_error(ours, forward()) > 1e-3  # diffusers' own frequencies: another function
    assert export.use_official_timesteps(theirs) is theirs
    assert parity.relative_error(ours, forward()) < 1e-4


def test_diffusers_round_trip_is_exact(tmp_path):
    from safetensors.numpy import load_file

    tiny_torch_dit().save_pretrained(tmp_path / "orig")
    folder = export.export(str(tmp_path / "orig"), tmp_path / "again", format="diffusers")
    before = load_file(tmp_path / "orig" / export.DIFFUSERS_WEIGHTS)
    after = load_file(folder / export.DIFFUSERS_WEIGHTS)
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    config_before = json.loads((tmp_path / "orig" / "config.json").read_text())
    config_after = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in config_before.items() if not k.startswith("_")} == \
        {k: v for k, v in config_after.items() if not k.startswith("_")}


def test_a_workdir_exports_its_ema(tiny_workdir, tmp_path):
    loaded = load_dit(str(tiny_workdir))
    path = export.export(str(tiny_workdir), tmp_path / "ema.pt")
    again = load_dit(str(path), num_heads=loaded.info["architecture"]["num_heads"])
    assert again.info["architecture"] == {k: v for k, v in loaded.info["architecture"].items() if k != "guidance"}
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loaded.model)), nnx.to_flat_state(nnx.state(again.model))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


@pytest.mark.slow
def test_the_export_command(official_pt, tmp_path):
    out = tmp_path / "cli"
    # Relative paths, as the README's example types them.
    proc = subprocess.run([sys.executable, "-m", "dit_jax.export", f"--ckpt={official_pt.name}", "--out=cli/",
                           "--format=diffusers", "--num_heads=4"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {out} (diffusers format)" in proc.stdout
    assert json.loads((out / "config.json").read_text())["_class_name"] == "DiTTransformer2DModel"
