"""weights/: the download registry and cache (fetch), loading any DiT checkpoint (load), fine-tuning."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dit_jax.models import architecture
from dit_jax.weights import fetch, finetune, load



def zip_of(data: bytes) -> bytes:
    """A zip archive holding ``data`` uncompressed (the container of .pt and .npz files)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data/0", data)
    return buffer.getvalue()


BODY = zip_of(np.random.default_rng(0).integers(0, 256, 3 * fetch.CHUNK + 12345, np.uint8).tobytes())
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def served(file_server, monkeypatch, tmp_path):
    """``weights.bin`` on the test server, registered as ``test/weights.bin`` (size and checksum known)."""
    file_server.files["/weights.bin"] = BODY
    monkeypatch.setitem(fetch.REGISTRY, "weights.bin", fetch.RemoteFile(
        file_server.url + "/weights.bin", "test weights", size=len(BODY), sha256=SHA))
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(fetch.OFFLINE_ENV, raising=False)
    monkeypatch.delenv(fetch.MIRROR_ENV, raising=False)
    return file_server


@pytest.fixture
def mirror(file_server, monkeypatch, tmp_path):
    """The test server as ``DIT_JAX_MIRROR`` for the real registry names, with an empty cache."""
    monkeypatch.setenv(fetch.MIRROR_ENV, file_server.url + "/")
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(fetch.OFFLINE_ENV, raising=False)
    return file_server


def test_name_or_path_keeps_names_and_hub_ids_and_resolves_every_typed_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "runs").mkdir()
    names = tuple(fetch.REGISTRY)
    assert fetch.name_or_path("DiT-XL-2-256x256.pt", names) == "DiT-XL-2-256x256.pt"
    assert fetch.name_or_path("DiT-XL-2-256x256.pt") == str(tmp_path / "DiT-XL-2-256x256.pt")  # not a name here
    assert fetch.name_or_path("owner/model") == "owner/model"  # reads as a hub id
    assert fetch.name_or_path("runs/x") == str(tmp_path / "runs" / "x")  # runs/ exists: a path
    assert fetch.name_or_path("./w/") == fetch.name_or_path("w") == str(tmp_path / "w")
    assert fetch.name_or_path("~/vae/") == str(tmp_path / "home" / "vae")
    assert fetch.name_or_path("gs://bucket/run") == "gs://bucket/run"


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "c"))
    assert fetch.cache_dir() == tmp_path / "c"
    assert fetch.local_path("DiT-XL-2-256x256.pt") == tmp_path / "c" / "DiT-XL-2-256x256.pt"
    assert fetch.local_path("stabilityai/sd-vae-ft-ema") == tmp_path / "c" / "hub" / "stabilityai/sd-vae-ft-ema"
    monkeypatch.delenv(fetch.CACHE_ENV)
    assert fetch.cache_dir() == Path("~/.cache/dit_jax").expanduser()


def test_registry_has_the_official_files():
    dit = fetch.REGISTRY["DiT-XL-2-256x256.pt"]
    assert dit.url == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    for name in ("DiT-XL-2-512x512.pt", "pt_inception-2015-12-05-6726825d.pth",
                 "weights-inception-2015-12-05-6726825d.pth", "VIRTUAL_imagenet256_labeled.npz",
                 "VIRTUAL_imagenet512.npz"):
        assert fetch.REGISTRY[name].url.endswith("/" + name)
    for repo in ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse", "facebook/DiT-XL-2-256"):
        assert fetch.REGISTRY[repo].repo_id == repo
    with pytest.raises(KeyError, match="not a registered download"):
        fetch.fetch("DiT-XL-2-1024x1024.pt")


def test_fetch_downloads_checks_and_caches(served):
    path = fetch.fetch("weights.bin", progress=False)
    assert path == fetch.cache_dir() / "weights.bin"
    assert path.read_bytes() == BODY
    assert not path.with_name("weights.bin.partial").exists()
    assert fetch.fetch("weights.bin", progress=False) == path
    assert served.requests == [("/weights.bin", None)]  # the second fetch found the file: no request


def test_an_interrupted_transfer_resumes_with_a_range_request(served):
    served.drop_after["/weights.bin"] = fetch.CHUNK + 100
    path = fetch.fetch("weights.bin", progress=False)
    assert path.read_bytes() == BODY
    assert served.requests == [("/weights.bin", None), ("/weights.bin", f"bytes={fetch.CHUNK + 100}-")]


def test_a_broken_download_keeps_its_partial_file_and_a_rerun_continues(served):
    served.drop_after["/weights.bin"] = 5000
    with pytest.raises(fetch.DownloadError, match="rerun to continue") as err:
        fetch.fetch("weights.bin", progress=False, retries=0)
    partial = fetch.cache_dir() / "weights.bin.partial"
    assert str(partial) in str(err.value)
    assert partial.read_bytes() == BODY[:5000]
    assert not (fetch.cache_dir() / "weights.bin").exists()  # a partial file never looks complete
    assert fetch.fetch("weights.bin", progress=False).read_bytes() == BODY
    assert served.requests[-1] == ("/weights.bin", "bytes=5000-")


def test_a_killed_download_continues(served):
    # What a SIGKILLed run leaves behind: the .partial file alone.
    cache = fetch.cache_dir()
    cache.mkdir(parents=True)
    (cache / "weights.bin.partial").write_bytes(BODY[:777])
    assert fetch.fetch("weights.bin", progress=False).read_bytes() == BODY
    assert served.requests == [("/weights.bin", "bytes=777-")]


@pytest.mark.parametrize("field, value, message", [("sha256", "0" * 64, "SHA-256"),
                                                   ("size", len(BODY) + 1, "bytes instead of")])
def test_a_wrong_checksum_or_size_deletes_the_download(served, monkeypatch, field, value, message):
    entry = fetch.REGISTRY["weights.bin"]
    monkeypatch.setitem(fetch.REGISTRY, "weights.bin",
                        dataclasses.replace(entry, **{field: value}))
    with pytest.raises(fetch.DownloadError, match=message):
        fetch.fetch("weights.bin", progress=False)
    assert os.listdir(fetch.cache_dir()) == ["weights.bin.lock"]  # neither the file nor a .partial


def test_offline_fails_at_once_naming_the_url_and_the_path(served, monkeypatch):
    monkeypatch.setenv(fetch.OFFLINE_ENV, "1")
    dest = fetch.cache_dir() / "weights.bin"
    with pytest.raises(fetch.MissingFileError) as err:
        fetch.fetch("weights.bin")
    assert served.url + "/weights.bin" in str(err.value) and f"put it at {dest}" in str(err.value)
    assert served.requests == []


def test_an_unreachable_server_fails_at_once_naming_the_url_and_the_path(monkeypatch, tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/DiT-XL-2-256x256.pt"
    monkeypatch.setitem(fetch.REGISTRY, "DiT-XL-2-256x256.pt",
                        dataclasses.replace(fetch.REGISTRY["DiT-XL-2-256x256.pt"], url=url))
    monkeypatch.delenv(fetch.OFFLINE_ENV, raising=False)
    start = time.time()
    with pytest.raises(FileNotFoundError) as err:
        fetch.fetch("DiT-XL-2-256x256.pt", cache=tmp_path)
    assert time.time() - start < 5
    assert url in str(err.value) and f"put it at {tmp_path / 'DiT-XL-2-256x256.pt'}" in str(err.value)


def test_an_offline_hub_folder_says_how_to_fetch_it(tmp_path):
    dest = tmp_path / "hub" / "facebook/DiT-XL-2-256"
    with pytest.raises(FileNotFoundError, match="hf download facebook/DiT-XL-2-256") as err:
        fetch.fetch("facebook/DiT-XL-2-256", cache=tmp_path, offline=True)
    assert str(dest) in str(err.value)
    # A complete folder in the cache is used without the network.
    (dest / "transformer").mkdir(parents=True)
    (dest / "transformer/config.json").write_text("{}")
    (dest / "transformer/diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert fetch.fetch("facebook/DiT-XL-2-256", cache=tmp_path, offline=True) == dest


PAGE = b"<!DOCTYPE html><html><body>Access denied by the proxy</body></html>"


def test_a_mirror_serves_the_registry_under_its_names(mirror):
    body = zip_of(b"weights")
    mirror.files["/DiT-XL-2-256x256.pt"] = body
    assert fetch.url_of("DiT-XL-2-256x256.pt") == mirror.url + "/DiT-XL-2-256x256.pt"
    assert fetch.fetch("DiT-XL-2-256x256.pt", progress=False).read_bytes() == body
    assert mirror.requests == [("/DiT-XL-2-256x256.pt", None)]
    with pytest.raises(fetch.MissingFileError) as err:  # the offline message names the mirror's URL
        fetch.fetch("DiT-XL-2-512x512.pt", offline=True)
    assert f"{mirror.url}/DiT-XL-2-512x512.pt" in str(err.value)


@pytest.mark.parametrize("headers", [{"Content-Type": "text/html; charset=utf-8"}, {"Content-Type": None}])
def test_an_html_page_never_enters_the_cache(mirror, headers):
    mirror.files["/DiT-XL-2-256x256.pt"] = PAGE
    mirror.headers["/DiT-XL-2-256x256.pt"] = headers
    for _ in range(2):  # every fetch asks again: nothing was cached
        with pytest.raises(fetch.DownloadError, match="HTML") as err:
            fetch.fetch("DiT-XL-2-256x256.pt", progress=False)
        assert "\n" not in str(err.value)
    assert len(mirror.requests) == 2
    assert sorted(os.listdir(fetch.cache_dir())) == ["DiT-XL-2-256x256.pt.lock"]


@pytest.mark.parametrize("name, whole", [
    ("VIRTUAL_imagenet512.npz", zip_of(b"x" * 5000)),
    ("pt_inception-2015-12-05-6726825d.pth", zip_of(b"y" * 5000)),
])
def test_a_body_cut_short_without_a_length_never_enters_the_cache(mirror, name, whole):
    mirror.files[f"/{name}"] = whole
    mirror.headers[f"/{name}"] = {"Content-Length": None}
    mirror.drop_after[f"/{name}"] = len(whole) - 30  # the end of the zip (its central directory) never arrives
    with pytest.raises(fetch.DownloadError, match="cut short") as err:
        fetch.fetch(name, progress=False)
    assert "it was deleted" in str(err.value)
    assert not (fetch.cache_dir() / name).exists() and not (fetch.cache_dir() / f"{name}.partial").exists()
    assert fetch.fetch(name, progress=False).read_bytes() == whole  # the next try gets the whole file


def test_a_bad_file_in_the_cache_is_named_not_returned(mirror):
    cache = fetch.cache_dir()
    cache.mkdir(parents=True)
    (cache / "DiT-XL-2-256x256.pt").write_bytes(PAGE)  # what an older version kept
    with pytest.raises(fetch.DownloadError, match=f"{cache / 'DiT-XL-2-256x256.pt'} in the cache is not "
                       "DiT-XL-2-256x256.pt: it is an HTML or XML page.*Delete it"):
        fetch.fetch("DiT-XL-2-256x256.pt")
    assert mirror.requests == []


def test_format_problems(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.arange(6, dtype=np.float32)}, tmp_path / "w.safetensors")
    whole = (tmp_path / "w.safetensors").read_bytes()
    assert fetch.format_problem(tmp_path / "w.safetensors", "w.safetensors") is None
    (tmp_path / "w.safetensors").write_bytes(whole[:-4])
    assert "describes" in fetch.format_problem(tmp_path / "w.safetensors", "w.safetensors")
    (tmp_path / "legacy.pt").write_bytes(b"\x80\x02\x8a\x0alegacy torch pickle")
    assert fetch.format_problem(tmp_path / "legacy.pt", "DiT-XL-2-256x256.pt") is None
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 100)
    assert "not a zip archive" in fetch.format_problem(tmp_path / "junk.npz", "VIRTUAL_imagenet512.npz")


# ---------------------------------------------------------------- load_dit

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from dit_jax import export, parity, train, train_state  # noqa: E402
from tests.tiny_models import tiny_run_config  # noqa: E402
from tests.torch_references import official_state, save_torch, tiny_torch_dit  # noqa: E402


def reference_forward_error(model, reference) -> float:
    a = reference.arrays
    out = model(parity.nhwc(a["x"]), a["t"], a["y"])
    return parity.relative_error(np.transpose(np.asarray(out), (0, 3, 1, 2)), a["forward"])


def test_load_an_official_state_dict(reference, tmp_path):
    path = save_torch(tmp_path / "tiny.pt", official_state(reference))
    loaded = load.load_dit(str(path), num_heads=reference.config["num_heads"])
    assert reference_forward_error(loaded.model, reference) < 1e-5
    c = reference.config
    assert loaded.info["source"] == "official" and loaded.info["model"] is None
    assert loaded.info["image_size"] == 8 * c["input_size"] and loaded.info["num_classes"] == c["num_classes"]
    assert loaded.info["learn_sigma"] is True
    assert {k: loaded.info["architecture"][k] for k in c} == c


def test_an_official_training_checkpoint_loads_its_ema(reference, tmp_path):
    import argparse

    ema = official_state(reference)
    raw = {k: v + 1.0 for k, v in ema.items()}  # the non-EMA weights: must not be the ones loaded
    path = save_torch(tmp_path / "0000100.pt", {"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                                                "args": argparse.Namespace(model="custom", image_size=64,
                                                                           num_classes=10)})
    loaded = load.load_dit(str(path), num_heads=4)
    assert loaded.info["source"] == "official-train" and loaded.info["train_args"]["image_size"] == 64
    assert reference_forward_error(loaded.model, reference) < 1e-5


def test_another_model_or_resolution_lists_every_mismatch(reference, tmp_path):
    path = save_torch(tmp_path / "tiny.pt", official_state(reference))
    with pytest.raises(ValueError) as err:
        load.load_dit(str(path), model="DiT-S/2", image_size=256, num_classes=1000)
    message = str(err.value)
    assert "model: the checkpoint is a custom DiT (hidden_size 64 (asked 384), depth 2 (asked 12)" in message
    assert "image_size: the checkpoint has 64, asked 256" in message
    assert "num_classes: the checkpoint has 10, asked 1000" in message
    # A width that is no paper model's: its heads are not in the file.
    with pytest.raises(ValueError, match="heads is not in the file; give it with --num_heads N"):
        load.load_dit(str(path))


def test_a_file_that_is_no_dit_says_what_it_is(tmp_path, tiny_vae_dir):
    with pytest.raises(ValueError, match="not a DiT checkpoint: it holds a VAE"):
        load.load_dit(str(tiny_vae_dir / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "notes.pt").write_text("not a pickle")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load.load_dit(str(tmp_path / "notes.pt"))
    with pytest.raises(FileNotFoundError, match="DiT-XL-2-256x256.pt"):
        load.load_dit(str(tmp_path / "missing.pt"))


def test_load_a_workdir_takes_the_newest_ema_and_the_saved_config(tiny_workdir):
    loaded = load.load_dit(str(tiny_workdir))
    config = tiny_run_config()
    assert loaded.info["source"] == "workdir" and loaded.info["step"] == 3
    assert loaded.info["architecture"] == architecture(config.model)
    _, _, fresh = train_state.create_train_state(config)
    ours = nnx.to_flat_state(nnx.state(loaded.model, nnx.Param))
    raw = dict(nnx.to_flat_state(fresh.params))
    assert len(raw) == len(ours)
    for path, var in ours:  # the EMA of step 3 (write_checkpoints: params + 0.03), not the raw parameters
        np.testing.assert_allclose(np.asarray(var[...]), np.asarray(raw[path][...]) + 0.03, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="num_classes: the checkpoint has 4, asked 10"):
        load.load_dit(str(tiny_workdir), num_classes=10)


def test_a_corrupt_newest_step_falls_back_to_the_previous_one(tiny_workdir, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(tiny_workdir, workdir)
    for f in (workdir / "checkpoints" / "3" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files
            f.write_bytes(b"")
    loaded = load.load_dit(str(workdir / "checkpoints"))
    assert loaded.info["step"] == 2
    assert (workdir / "checkpoints" / "3").exists()  # reading never moves or deletes anything


def test_a_newest_step_never_committed_under_commit_file_is_skipped(tiny_workdir, tmp_path):
    """A run with train.checkpoint_atomicity commit_file (as on a gcsfuse mount; auto on gs://) killed before step
    3's commit_success.txt: loading takes step 2, as resuming would (checkpointing.is_committed)."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(tiny_workdir, workdir)
    for step in (2, 3):
        saved = workdir / "checkpoints" / str(step) / "config" / "metadata"
        config = json.loads(saved.read_text())
        saved.write_text(json.dumps({**config, "train": {**config["train"], "checkpoint_atomicity": "commit_file"}}))
    assert load.load_dit(str(workdir)).info["step"] == 3
    (workdir / "checkpoints" / "3" / "commit_success.txt").unlink()
    assert load.load_dit(str(workdir)).info["step"] == 2
    (workdir / "checkpoints" / "2" / "commit_success.txt").unlink()
    with pytest.raises(FileNotFoundError, match="step 3: never committed .*; step 2: never committed"):
        load.load_dit(str(workdir))


@pytest.mark.parametrize("typed", ["{name}", "{name}/", "./{name}/checkpoints", "~/{name}"])
def test_a_workdir_loads_by_any_path_a_user_types(tiny_workdir, monkeypatch, typed):
    # Orbax refuses relative paths (and its checkpointer reported that as a missing checkpoint).
    monkeypatch.chdir(tiny_workdir.parent)
    monkeypatch.setenv("HOME", str(tiny_workdir.parent))
    loaded = load.load_dit(typed.format(name=tiny_workdir.name))
    assert loaded.info["step"] == 3 and loaded.info["path"] == str(tiny_workdir / "checkpoints")


def test_init_from_a_relative_workdir(tiny_workdir, monkeypatch):
    monkeypatch.chdir(tiny_workdir.parent)
    _, _, fresh = train_state.create_train_state(tiny_run_config())
    _, report = finetune.init_train_state_from(tiny_workdir.name, fresh,
                                                 architecture=architecture(tiny_run_config().model))
    assert report["not_loaded"] == [] and len(report["loaded"]) == len(nnx.to_flat_state(fresh.params))


def test_unreadable_steps_are_reported_with_their_errors_in_one_line(tiny_workdir, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(tiny_workdir, workdir)
    for f in (workdir / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files of every step
            f.write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        load.load_dit(str(workdir))
    message = str(err.value)
    assert message.startswith(f"none of the checkpoints in {workdir / 'checkpoints'} can be read: step 3: ValueError: ")
    assert "; step 2: ValueError: " in message and "is not valid for value of size 0" in message
    assert "\n" not in message and "tensorstore_spec" not in message and "intact" not in message


def diffusers_forward(model, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(np.transpose(x_nhwc, (0, 3, 1, 2)).copy()), timestep=torch.from_numpy(t),
                    class_labels=torch.from_numpy(y)).sample
    return np.transpose(out.numpy(), (0, 2, 3, 1))


def test_load_a_diffusers_folder_without_torch_and_match_its_forward(tmp_path, monkeypatch):
    torch_model = tiny_torch_dit()
    torch_model.save_pretrained(tmp_path / "transformer")
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)  # the safetensors path must not need PyTorch
    loaded = load.load_dit(str(tmp_path))
    monkeypatch.undo()
    assert loaded.info["source"] == "diffusers" and loaded.info["num_classes"] == 10
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
    t, y = np.array([0, 10, 500, 999]), np.array([0, 3, 9, 10])
    ours = np.asarray(loaded.model(x, t, y))
    theirs_default = diffusers_forward(torch_model, x, t, y)
    export.use_official_timesteps(torch_model)
    theirs = diffusers_forward(torch_model, x, t, y)
    assert parity.relative_error(ours, theirs) < 1e-4
    # diffusers' own timestep frequencies (downscale_freq_shift=1) compute another function.
    assert parity.relative_error(ours, theirs_default) > 1e-3


def test_a_diffusers_dit_with_per_block_embedders_is_refused(tmp_path):
    tiny_torch_dit(shared_embedders=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different copies of norm1.emb.timestep_embedder"):
        load.load_dit(str(tmp_path))


# ---------------------------------------------------------------- fine-tuning (train.init_from)

def finetune_config(reference, **model):
    """A run of the reference's DiT (latents, 4 channels) with ``model`` fields changed."""
    from dit_jax import recipes

    c = recipes.base_config()
    c.model.update(name="", **{**reference.config, **model})
    return c


def test_init_from_another_class_count_and_resolution_loads_the_rest(reference, tmp_path):
    from dit_jax.weights import convert

    path = save_torch(tmp_path / "tiny.pt", official_state(reference))
    config = finetune_config(reference, input_size=16, num_classes=7)  # 8x8 -> 16x16 latents, 10 -> 7 classes
    graphdef, fixed, fresh = train_state.create_train_state(config)
    state, report = finetune.init_train_state_from(str(path), fresh,
                                                     architecture=architecture(config.model))
    assert report["not_loaded"] == [finetune.LABEL_TABLE]
    file = official_state(reference)
    assert sorted(report["loaded"]) == sorted(set(file) - {"pos_embed", finetune.LABEL_TABLE})
    fresh_flat = dict(nnx.to_flat_state(fresh.params))
    ours = convert.to_official_state_dict(nnx.merge(graphdef, state.params, fixed))
    for flat_path, var in nnx.to_flat_state(state.params):
        name = convert.official_name(flat_path)
        if name == finetune.LABEL_TABLE:  # the fresh initialisation, 7 + 1 rows
            np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(fresh_flat[flat_path][...]))
        else:
            np.testing.assert_array_equal(ours[name], file[name], err_msg=name)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params)):  # EMA copied too
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state)):  # a fresh optimiser
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model = nnx.merge(graphdef, state.params, fixed)  # the 16x16 position table, recomputed
    from dit_jax.models import sincos_2d_pos_embed
    np.testing.assert_allclose(np.asarray(model.pos_embed[...])[0], sincos_2d_pos_embed(64, 8), atol=1e-6)


def test_init_from_another_model_names_the_fields_to_set(reference, tmp_path):
    path = save_torch(tmp_path / "tiny.pt", official_state(reference))
    config = finetune_config(reference, depth=3, hidden_size=32, num_heads=2)
    _, _, fresh = train_state.create_train_state(config)
    with pytest.raises(ValueError) as err:
        finetune.init_train_state_from(str(path), fresh, architecture=architecture(config.model))
    c = reference.config
    assert str(err.value) == (
        f"train.init_from={str(path)!r} is a custom DiT (hidden_size {c['hidden_size']}, depth {c['depth']}), this "
        "run's model has hidden_size 32, depth 3: to fine-tune it set --config.model.name='' "
        f"--config.model.patch_size={c['patch_size']} --config.model.hidden_size={c['hidden_size']} "
        f"--config.model.depth={c['depth']} and model.num_heads to the checkpoint's (its file does not record heads) "
        "(the resolution and the class count may differ)")
    # A paper model is named by model.name, any other field one by one.
    from dit_jax.models import MODELS

    common = dict(input_size=32, in_channels=4, mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1,
                  block_type="adaln_zero")
    info = {"model": "DiT-XL/2", "architecture": {**MODELS["DiT-XL/2"], **common, "learn_sigma": True}}
    run = {**MODELS["DiT-S/2"], **common, "learn_sigma": False, "input_size": 64, "num_classes": 10}
    assert finetune.architecture_settings("x.pt", info, run) == (
        "train.init_from='x.pt' is DiT-XL/2 (hidden_size 1152, depth 28, num_heads 16, learn_sigma True), this run's "
        "model has hidden_size 384, depth 12, num_heads 6, learn_sigma False: to fine-tune it set "
        "--config.model.name=DiT-XL/2 --config.model.learn_sigma=True (the resolution and the class count may differ)")
    assert finetune.architecture_settings("x.pt", info, {**info["architecture"], "num_classes": 10}) is None


def test_init_from_is_validated_up_front(tmp_path):
    config = tiny_run_config(train=dict(init_from=str(tmp_path / "no_such.pt")))
    with pytest.raises(ValueError, match="init_from=.*neither an existing file"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config.train.init_from = "stabilityai/sd-vae-ft-ema"
    with pytest.raises(ValueError, match="not a DiT"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_a_fine_tune_trains_and_resumes_from_its_own_checkpoints(tiny_workdir, tmp_path, monkeypatch):
    workdir = tmp_path / "finetune"
    # The tiny run's checkpoint (4 classes, 32x32) fine-tuned to 5 classes at 16x16.
    config = tiny_run_config(model=dict(num_classes=5, input_size=16), data=dict(image_size=16),
                             train=dict(steps=2, init_from=str(tiny_workdir)))
    train.train_and_evaluate(config, str(workdir))
    report = json.loads((workdir / "init_from.json").read_text())
    assert report["init_from"] == str(tiny_workdir) and report["not_loaded"] == [finetune.LABEL_TABLE]
    calls = []
    monkeypatch.setattr(load, "load_dit", lambda *a, **k: calls.append(a))
    config.train.steps = 3
    summary = train.train_and_evaluate(config, str(workdir))
    assert summary["resumed_from_step"] == 2 and calls == []  # its own checkpoint, never init_from again
