"""The Flax VAE matches diffusers' AutoencoderKL, loads every diffusers weight format, and fails clearly."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from dit_jax import vae
from tests.torch_references import tiny_torch_vae


def relative_error(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def torch_outputs():
    """diffusers' posterior and reconstruction of a random batch (NCHW -> NHWC)."""
    model = tiny_torch_vae()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 40)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
        decoded = model.decode(posterior.mean).sample
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return {"x": x.transpose(0, 2, 3, 1), "mean": to_nhwc(posterior.mean), "logvar": to_nhwc(posterior.logvar),
            "std": to_nhwc(posterior.std), "decoded": to_nhwc(decoded)}


def check_parity(model: vae.AutoencoderKL, expected: dict) -> None:
    mean, logvar = model.encode(jnp.asarray(expected["x"]))
    assert mean.shape == (2, 16, 20, 4)
    assert relative_error(mean, expected["mean"]) < 1e-4
    assert relative_error(logvar, expected["logvar"]) < 1e-4
    assert relative_error(jnp.exp(0.5 * logvar), expected["std"]) < 1e-4
    decoded = model.decode(mean)
    assert decoded.shape == (2, 32, 40, 3)
    assert relative_error(decoded, expected["decoded"]) < 1e-4


def test_safetensors_folder_matches_diffusers(tiny_vae_dir, torch_outputs):
    model = vae.load_vae(str(tiny_vae_dir))
    assert model.config.scaling_factor == 0.18215 and model.config.downsample_factor == 2
    check_parity(model, torch_outputs)


def test_bin_folder_matches_diffusers(tmp_path, torch_outputs):
    tiny_torch_vae().save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    check_parity(vae.load_vae(str(tmp_path)), torch_outputs)


def test_legacy_attention_names_load(tiny_vae_dir, tmp_path, torch_outputs):
    """Older diffusers checkpoints name the attention layers query/key/value/proj_attn."""
    weights = load_file(str(tiny_vae_dir / "diffusion_pytorch_model.safetensors"))
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for name, value in weights.items():
        for new, old in legacy.items():
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = value
    assert any(".proj_attn." in n for n in renamed)
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(tiny_vae_dir / "config.json", tmp_path / "config.json")
    check_parity(vae.load_vae(str(tmp_path)), torch_outputs)


def test_mismatched_weights_are_listed(tiny_vae_dir, tmp_path):
    weights = load_file(str(tiny_vae_dir / "diffusion_pytorch_model.safetensors"))
    weights.pop("decoder.conv_out.bias")
    weights["encoder.conv_in.weight"] = weights["encoder.conv_in.weight"][:4]
    weights["extra.weight"] = np.zeros(3, np.float32)
    save_file(weights, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(tiny_vae_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError) as err:
        vae.load_vae(str(tmp_path))
    message = str(err.value)
    assert "missing (1): decoder.conv_out.bias" in message
    assert "unexpected (1): extra.weight" in message
    assert "encoder.conv_in.weight: checkpoint (4, 3, 3, 3), model (8, 3, 3, 3)" in message


def test_unsupported_config_is_named(tiny_vae_dir, tmp_path):
    config = json.loads((tiny_vae_dir / "config.json").read_text())
    config["act_fn"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_vae_dir / "diffusion_pytorch_model.safetensors", tmp_path)
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        vae.load_vae(str(tmp_path))


def test_missing_files_and_offline_hub_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs config.json and one of"):
        vae.load_vae(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist \\(no such folder: .*no/such/vae\\)"):
        vae.load_vae(str(tmp_path / "no" / "such" / "vae"))
    # A hub id that is not in the (empty) cache, offline: tell the user how to fetch it.
    with pytest.raises(FileNotFoundError, match="no such local folder.*hf download stabilityai/sd-vae-ft-ema"):
        vae.load_vae("stabilityai/sd-vae-ft-ema", cache_dir=str(tmp_path / "hub"), offline=True)


def test_a_mistyped_local_folder_with_one_slash_is_named_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vaes").mkdir()
    for typo in ("vaes/sd-vae-ft-eam", "./sd-vae-ft-ema"):
        with pytest.raises(FileNotFoundError, match=f"'{typo}' does not exist \\(no such folder: {tmp_path}/") as e:
            vae.resolve(typo, cache_dir=str(tmp_path / "hub"), offline=True)
        assert "hf download" not in str(e.value)
