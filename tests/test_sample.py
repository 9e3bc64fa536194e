"""Guided sampling: shapes, determinism, agreement with the diffusion loops, clear errors; the sampling
engine (same bytes on 1 and 8 devices, resumable ADM npz, NaN stop) and ``python -m dit_jax.sample``."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dit_jax import diffusion as gd, locking, sample, sharding, vae
from dit_jax.models import DiT
from dit_jax.sampling import blocks as sample_blocks, engine
from dit_jax.weights import fetch
from tests.processes import persistent_compile_cache, sample_command
from tests.tiny_models import TINY_LATENT_DIT, tiny_latent_dit
from tests.torch_references import write_official_checkpoint

TINY = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def model():
    m = DiT(**TINY, rngs=nnx.Rngs(0))
    # Non-zero output layers so the samples depend on labels and guidance.
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(m, nnx.Param))):
        var[...] = 0.05 * jax.random.normal(jax.random.key(i), var[...].shape)
    return m


def test_samples_have_the_model_shape_and_are_deterministic(model):
    chain = gd.create_diffusion("5")
    labels = jnp.array([0, 1, 4])
    a = engine.generate(model, chain, labels, jax.random.key(0), cfg_scale=2.0)
    b = engine.generate(model, chain, labels, jax.random.key(0), cfg_scale=2.0)
    c = engine.generate(model, chain, labels, jax.random.key(1), cfg_scale=2.0)
    assert a.shape == (3, 8, 8, 3) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_generate_is_the_guided_ddim_loop(model):
    chain = gd.create_diffusion("ddim5")
    labels = jnp.array([2, 3])
    key = jax.random.key(7)
    ours = engine.generate(model, chain, labels, key, cfg_scale=3.0, sampler="ddim")
    noise = jax.random.normal(jax.random.split(key)[0], (2, 8, 8, 3))
    y = jnp.concatenate([labels, jnp.full_like(labels, TINY["num_classes"])])
    loop = gd.ddim_sample_loop(chain, lambda x, t: model.forward_with_cfg(x, t, y, 3.0),
                               jnp.concatenate([noise, noise]), jax.random.split(key)[1])
    np.testing.assert_allclose(ours, loop[:2], rtol=1e-5, atol=1e-5)


def test_guidance_scale_changes_samples(model):
    chain = gd.create_diffusion("ddim5")
    labels = jnp.array([0, 1])
    one = engine.generate(model, chain, labels, jax.random.key(0), cfg_scale=1.0, sampler="ddim")
    four = engine.generate(model, chain, labels, jax.random.key(0), cfg_scale=4.0, sampler="ddim")
    assert not np.allclose(one, four)


@pytest.mark.parametrize("labels, kwargs, message", [
    (jnp.array([0, 5]), {}, r"class labels must be in \[0, 4\]"),
    (jnp.array([-1]), {}, "class labels must be in"),
    (jnp.array([0.5]), {}, "labels must be integers"),
    (jnp.array([0]), {"sampler": "euler"}, "sampler 'euler'"),
])
def test_bad_requests_are_named(model, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(model, gd.create_diffusion("5"), labels, jax.random.key(0), **kwargs)


def test_guidance_needs_a_null_label():
    m = DiT(**TINY, class_dropout_prob=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        engine.generate(m, gd.create_diffusion("5"), jnp.array([0]), jax.random.key(0))


# ---------------------------------------------------------------- the sampling engine (python -m dit_jax.sample)

ENGINE_CHAIN = "4"
PER_DEVICE = 2
N = 21  # not a multiple of any block: the last one is padded
N_KILL = 161  # 11 blocks of 16 on 8 devices
SEED = 3


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent compilation cache for this module's runs and the commands it starts."""
    with persistent_compile_cache(tmp_path_factory.mktemp("jax_cache")) as env:
        yield env


@pytest.fixture(scope="module")
def latent_model():
    return tiny_latent_dit()


@pytest.fixture(scope="module")
def tiny_vae(tiny_vae_dir):
    return vae.load_vae(str(tiny_vae_dir))


def one_device_mesh():
    return sharding.create_mesh({"data": 1}, jax.devices()[:1])


def tiny_sampler(model, tiny_vae, *, mesh=None, cfg_scale=1.5):
    return engine.create_image_sampler(model, gd.create_diffusion(ENGINE_CHAIN), cfg_scale=cfg_scale, vae=tiny_vae,
                                       per_device_batch=PER_DEVICE, mesh=mesh)


def fid_labels(n: int) -> np.ndarray:
    return engine.random_labels(SEED, n, TINY_LATENT_DIT["num_classes"])


@pytest.fixture(scope="module")
def one_device(latent_model, tiny_vae, compile_cache):
    """N samples on one device, block by block: what every other run must equal byte for byte."""
    blocks = list(engine.iterate_blocks(tiny_sampler(latent_model, tiny_vae, mesh=one_device_mesh()), fid_labels(N),
                                        seed=SEED))
    assert [b.start for b in blocks] == list(range(0, N, PER_DEVICE))
    return np.concatenate([b.images for b in blocks])


@pytest.fixture(scope="module")
def eight_devices(latent_model, tiny_vae, compile_cache) -> Callable[[int], np.ndarray]:
    """``eight_devices(n)``: the first ``n`` samples on the 8 devices (N are tested equal to ``one_device``)."""
    return functools.cache(lambda n: engine.sample_uint8(latent_model, gd.create_diffusion(ENGINE_CHAIN), fid_labels(n),
                                                         seed=SEED, cfg_scale=1.5, vae=tiny_vae,
                                                         per_device_batch=PER_DEVICE))


def test_labels_depend_only_on_seed_and_index():
    labels = engine.random_labels(0, 2000, 7)
    np.testing.assert_array_equal(engine.random_labels(0, 30, 7), labels[:30])
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(7))
    assert not np.array_equal(engine.random_labels(1, 30, 7), labels[:30])
    assert np.bincount(engine.balanced_labels(50_000, 1000)).tolist() == [50] * 1000


def test_eight_devices_give_the_bytes_of_one(one_device, eight_devices):
    images = one_device
    assert images.shape == (N, 16, 16, 3) and images.dtype == np.uint8  # 8x8 latents, the tiny VAE upsamples 2x
    assert len(np.unique(images.reshape(N, -1), axis=0)) == N and images.std() > 10  # real, distinct pictures
    np.testing.assert_array_equal(eight_devices(N), images)


def test_write_samples_resumes_across_device_counts_into_an_adm_npz(tmp_path, one_device, latent_model, tiny_vae,
                                                                    monkeypatch):
    labels, images = fid_labels(N), one_device
    out = tmp_path / "fid"
    settings = {"ckpt": "tiny"}
    (out / sample_blocks.BLOCKS_DIR).mkdir(parents=True)
    (out / sample_blocks.BLOCKS_DIR / "stray.npz").write_bytes(b"")
    with pytest.raises(FileExistsError, match="no settings.json"):
        sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae), labels, seed=SEED, settings=settings)
    (out / sample_blocks.BLOCKS_DIR / "stray.npz").unlink()
    # A run on one device is killed after writing 3 blocks (while writing a 4th) ...
    iterate_blocks = engine.iterate_blocks

    def killed_after_three_blocks(*args, **kwargs):
        for i, block in enumerate(iterate_blocks(*args, **kwargs)):
            if i == 3:
                (out / sample_blocks.BLOCKS_DIR / "00000006-00000008.npz.tmp").write_bytes(b"partial")
                raise KeyboardInterrupt
            yield block

    monkeypatch.setattr(engine, "iterate_blocks", killed_after_three_blocks)
    with pytest.raises(KeyboardInterrupt):
        sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae, mesh=one_device_mesh()), labels, seed=SEED,
                             settings=settings)
    monkeypatch.undo()
    assert sorted(os.listdir(out / sample_blocks.BLOCKS_DIR)) == [
        "00000000-00000002.npz", "00000002-00000004.npz", "00000004-00000006.npz", "00000006-00000008.npz.tmp"]
    # ... and the same command resumes on 8 devices.
    path = sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae), labels, seed=SEED, settings=settings,
                                progress=False)
    with np.load(path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], labels)
    assert os.listdir(out / sample_blocks.BLOCKS_DIR) == []  # the blocks are in the npz now
    written = json.loads((out / sample_blocks.SETTINGS_JSON).read_text())
    assert written["settings"]["cfg_scale"] == 1.5 and written["settings"]["guidance_channels"] == 3
    assert written["settings"]["num_samples"] == N and written["settings"]["seed"] == SEED
    assert written["settings"]["sampler"] == "ddpm" and written["settings"]["num_sampling_steps"] == 4
    assert written["run"]["resumed_at"] == 6 and written["software"]["jax"] == jax.__version__
    # Rerun: nothing to do. Other settings: refused, naming them.
    mtime = os.stat(path).st_mtime_ns
    assert sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae), labels, seed=SEED, settings=settings) == path
    assert os.stat(path).st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"cfg_scale: was 1.5, now 2.0.*seed: was 3, now 4"):
        sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae, cfg_scale=2.0), labels, seed=4,
                             settings=settings)


def test_a_truncated_block_is_found_at_the_start_set_aside_and_made_again_alone(tmp_path, one_device, latent_model,
                                                                               tiny_vae, monkeypatch):
    labels, out, n = fid_labels(8), tmp_path / "fid", 8
    iterate_blocks, calls = engine.iterate_blocks, []

    def killed_after_three_blocks(*args, **kwargs):
        for i, block in enumerate(iterate_blocks(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield block

    monkeypatch.setattr(engine, "iterate_blocks", killed_after_three_blocks)
    with pytest.raises(KeyboardInterrupt):
        sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae, mesh=one_device_mesh()), labels, seed=SEED)
    block = out / sample_blocks.BLOCKS_DIR / "00000002-00000004.npz"
    block.write_bytes(block.read_bytes()[:-40])  # cut short (a full disk, a bad copy)

    def recorded(image_sampler, block_labels, *, seed, start=0):
        calls.append((start, len(block_labels)))
        return iterate_blocks(image_sampler, block_labels, seed=seed, start=start)

    monkeypatch.setattr(engine, "iterate_blocks", recorded)
    path = sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae, mesh=one_device_mesh()), labels, seed=SEED,
                                progress=False)
    assert calls == [(2, 4), (6, n)]  # the damaged block alone, then the samples never made
    assert os.listdir(out / sample_blocks.BLOCKS_DIR) == ["00000002-00000004.npz.damaged"]
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["arr_0"], one_device[:n])


def test_a_nan_sample_stops_before_its_block_is_written(tmp_path, latent_model, tiny_vae):
    broken = nnx.clone(latent_model)
    broken.final_layer.linear.bias[...] = broken.final_layer.linear.bias[...].at[5].set(jnp.nan)
    labels = np.arange(4, dtype=np.int32)
    with pytest.raises(engine.NonFiniteSampleError, match=r"block 0\.\.1 .*with seed 7"):
        sample_blocks.write_samples(str(tmp_path), tiny_sampler(broken, tiny_vae, mesh=one_device_mesh()), labels, seed=7)
    assert os.listdir(tmp_path / sample_blocks.BLOCKS_DIR) == [] and not (tmp_path / sample_blocks.SAMPLES_NPZ).exists()


def test_engine_refuses_bad_settings(latent_model, tiny_vae):
    chain = gd.create_diffusion("2")
    cases = [
        (dict(cfg_scale=0.5), "cfg_scale must be >= 1"),
        (dict(cfg_scale=1.5, per_device_batch=0), "per_device_batch must be >= 1"),
        (dict(cfg_scale=1.5, sampler="euler"), "sampler 'euler'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            engine.create_image_sampler(latent_model, chain, vae=tiny_vae, **kwargs)
    with pytest.raises(ValueError, match="learn_sigma=False"):
        engine.create_image_sampler(latent_model, gd.create_diffusion("2", learn_sigma=False), cfg_scale=1.5)
    pixels = DiT(**TINY, rngs=nnx.Rngs(0))  # 3 channels: a pixel-space model
    with pytest.raises(ValueError, match="3-channel arrays but the VAE decodes 4-channel latents"):
        engine.create_image_sampler(pixels, chain, cfg_scale=1.5, vae=tiny_vae)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 4\]"):
        engine.sample_uint8(latent_model, chain, np.array([0, 5]), seed=0, cfg_scale=1.5)
    with pytest.raises(ValueError, match="labels must be integers"):
        engine.sample_uint8(latent_model, chain, np.array([0.5]), seed=0, cfg_scale=1.5)


def test_a_second_sampler_on_the_same_out_refuses_and_a_refused_run_leaves_no_blocks_folder(
        tmp_path, latent_model, tiny_vae):
    out = tmp_path / "fid"
    with locking.hold(str(out), purpose="sampling"):
        with pytest.raises(locking.LockHeldError, match=f"{out} is in use by sampling on host .* still running"):
            sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae), fid_labels(4), seed=SEED)
    assert not out.exists()  # the folder the refused run's lock made is gone again
    out.mkdir()
    (out / sample_blocks.SAMPLES_NPZ).write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="no settings.json"):
        sample_blocks.write_samples(str(out), tiny_sampler(latent_model, tiny_vae), fid_labels(4), seed=SEED)
    assert os.listdir(out) == [sample_blocks.SAMPLES_NPZ]  # no empty blocks/ left behind


# ---------------------------------------------------------------- the command on a tiny official-format .pt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, latent_model):
    return write_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-dit.pt", latent_model)


def tiny_flags(tiny_ckpt, tiny_vae_dir) -> list[str]:
    return ["--ckpt", str(tiny_ckpt), "--num_heads", "2", "--vae", str(tiny_vae_dir), "--num_sampling_steps",
            ENGINE_CHAIN, "--per_device_batch", str(PER_DEVICE)]


def test_picture_mode_writes_the_official_grid(tmp_path, tiny_ckpt, tiny_vae_dir, latent_model, tiny_vae,
                                               compile_cache):
    png = tmp_path / "grid.png"
    proc = subprocess.run(sample_command(*tiny_flags(tiny_ckpt, tiny_vae_dir), "--labels", "1,2,3,4,0",
                                         "--png", str(png)),
                          cwd=ROOT, env={**os.environ, **compile_cache}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Progress: a line when sampling starts and per block (at most every 30 s); no library INFO chatter.
    assert re.search(r"\] sampling \(\d+ ddpm steps a block\): 5 images to do\n", proc.stderr), proc.stderr[-3000:]
    assert re.search(r"\] sampling \(\d+ ddpm steps a block\): 5/5 images, .* left\n", proc.stderr)
    assert not re.search(r"^I\d{4} .* (checkpoint_manager|composite_checkpoint_handler|local)\.py", proc.stderr, re.M)
    grid = np.asarray(Image.open(png))
    assert grid.shape == (2 + 2 * 18, 2 + 4 * 18, 3)  # 4 a row as the official save_image, 2 px padding
    expected = engine.sample_uint8(latent_model, gd.create_diffusion(ENGINE_CHAIN), np.array([1, 2, 3, 4, 0]),
                                   seed=0, cfg_scale=4.0, vae=tiny_vae, per_device_batch=PER_DEVICE)
    for i, image in enumerate(expected):
        row, col = divmod(i, 4)
        np.testing.assert_array_equal(grid[2 + 18 * row:18 * (row + 1), 2 + 18 * col:18 * (col + 1)], image)
    assert (grid[2 + 18:, 2 + 18:] == 255).all()  # the empty places of the second row


@pytest.mark.slow  # two command runs; test_write_samples_resumes_across_device_counts_into_an_adm_npz is the fast one
def test_fid_mode_killed_then_rerun_gives_the_same_bytes(tmp_path, tiny_ckpt, tiny_vae_dir, eight_devices,
                                                         compile_cache):
    labels, images = fid_labels(N_KILL), eight_devices(N_KILL)
    out = tmp_path / "fid"
    command = sample_command(*tiny_flags(tiny_ckpt, tiny_vae_dir), "--num_samples", str(N_KILL), "--out", str(out),
                             "--seed", str(SEED))
    env = {**os.environ, **compile_cache}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and len(list((out / sample_blocks.BLOCKS_DIR).glob("*.npz"))) < 3:
            assert time.time() < deadline, "no block was written within 300 s"
            time.sleep(0.002)
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (out / sample_blocks.SAMPLES_NPZ).exists()
    done = len(list((out / sample_blocks.BLOCKS_DIR).glob("*.npz")))
    assert 3 <= done < N_KILL // (8 * PER_DEVICE)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    with np.load(out / sample_blocks.SAMPLES_NPZ) as npz:
        np.testing.assert_array_equal(npz["arr_0"], images)
        np.testing.assert_array_equal(npz["arr_1"], labels)
    settings = json.loads((out / sample_blocks.SETTINGS_JSON).read_text())["settings"]
    assert settings["ckpt"] == str(tiny_ckpt) and settings["vae"] == str(tiny_vae_dir)
    assert settings["labels"] == "uniform" and len(settings["weights_sha256"]) == 64
    assert settings["checkpoint"]["num_classes"] == TINY_LATENT_DIT["num_classes"]


def test_fid_mode_with_balanced_labels_and_a_rerun_with_nothing_to_do(tmp_path, tiny_ckpt, tiny_vae_dir,
                                                                      compile_cache):
    out, n = tmp_path / "fid", 7
    command = sample_command(*tiny_flags(tiny_ckpt, tiny_vae_dir), "--num_samples", str(n), "--out", str(out),
                             "--balanced_labels")
    env = {**os.environ, **compile_cache}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    npz = out / sample_blocks.SAMPLES_NPZ
    assert proc.stdout.splitlines()[-1] == f"wrote {npz}"
    with np.load(npz) as arrays:
        np.testing.assert_array_equal(arrays["arr_1"], np.arange(n) % TINY_LATENT_DIT["num_classes"])
    assert json.loads((out / sample_blocks.SETTINGS_JSON).read_text())["settings"]["labels"] == "balanced"
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout == f"{npz} is complete (same settings); nothing to do\n"


def test_the_vae_defaults_as_the_official_scripts(tmp_path, tiny_ckpt, monkeypatch):
    """Pictures: mse (the official sample.py); FID: ema (sample_ddp.py)."""
    asked = []

    def load_decoder(name):
        asked.append(name)
        raise ValueError("stop here")

    monkeypatch.setattr(sample, "load_decoder", load_decoder)
    for kwargs in ({}, dict(num_samples=4, out=str(tmp_path / "o"))):
        with pytest.raises(ValueError, match="stop here"):
            sample.run(str(tiny_ckpt), num_heads=2, **kwargs)
    assert asked == ["mse", "ema"]


def test_out_png_and_vae_paths_resolve_relative_and_home_forms(tmp_path, tiny_ckpt, tiny_vae_dir, monkeypatch):
    """``~``, relative and trailing-slash forms name the same places as their absolute paths; hub ids stay."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir(), home.mkdir()
    (home / "vae").symlink_to(tiny_vae_dir)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    seen = []
    monkeypatch.setattr(sample, "load_decoder", lambda name: seen.append(name))  # None: no VAE to load
    monkeypatch.setattr(sample, "sample_picture", lambda *args, png, **kwargs: None)
    monkeypatch.setattr(sample, "create_image_sampler", lambda *args, **kwargs: None)
    monkeypatch.setattr(sample, "write_samples", lambda out, *args, settings, **kwargs: seen.append(settings) or out)
    assert sample.run(str(tiny_ckpt), num_heads=2, vae="~/vae", png="~/grid.png") == (str(home / "grid.png"), True)
    assert sample.run(str(tiny_ckpt), num_heads=2, vae="../home/vae/", png="grid.png")[0] == str(work / "grid.png")
    path, _ = sample.run(os.path.relpath(tiny_ckpt), num_heads=2, vae="~/vae", num_samples=2, out="runs/fid/")
    assert path == str(work / "runs" / "fid")
    assert seen[:3] == [str(home / "vae")] * 3 and seen[3]["vae"] == str(home / "vae")
    assert seen[3]["ckpt"] == str(tiny_ckpt)  # recorded resolved: the same run resumes from any folder
    assert sample.run(str(tiny_ckpt), num_heads=2, vae="owner/some-vae", num_samples=2, out="~/fid")[0] == str(
        home / "fid")
    assert seen[4] == "owner/some-vae"  # a hub id is not a path


def test_the_command_names_bad_labels_checkpoints_and_sizes(tmp_path, tiny_ckpt, tiny_vae_dir):
    common = dict(num_heads=2, vae=str(tiny_vae_dir), num_sampling_steps=2)
    cases = [
        (dict(labels="1,x"), "comma-separated class indices"),
        (dict(labels="1,9"), r"class indices in \[0, 4\].*got \[9\]"),
        (dict(labels="3", num_samples=10, out=str(tmp_path / "o")), "--labels is for picture mode"),
        (dict(num_samples=10), "needs both --num_samples N and --out DIR"),
        (dict(balanced=True), "--balanced_labels is for FID mode"),
        (dict(num_samples=0, out=str(tmp_path / "o")), "--num_samples must be >= 1"),
        (dict(per_device_batch=0), "--per_device_batch must be >= 1"),
        (dict(image_size=512), "image_size"),
        (dict(model="DiT-XL/2"), "DiT-XL/2"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sample.run(str(tiny_ckpt), **{**common, **kwargs})
    with pytest.raises(FileNotFoundError):
        sample.run(str(tmp_path / "missing.pt"), **common)
    assert [sample.released_checkpoint(s) for s in (256, 512)] == ["DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"]
    assert all(name in fetch.REGISTRY for name in map(sample.released_checkpoint, (256, 512)))
    with pytest.raises(ValueError, match="256x256 and 512x512; got image size 128"):
        sample.released_checkpoint(128)
    for labels, message in [("207,x", "comma-separated"), ([1, 5], r"class labels must be in \[0, 4\]"),
                            ("0,7", r"class indices in \[0, 4\].*got \[7\]")]:
        with pytest.raises(ValueError, match=message):  # before anything is compiled
            sample.sample_picture(tiny_latent_dit(), None, labels)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises((ValueError, OSError), match="garbage.pt"):
        sample.run(str(tmp_path / "garbage.pt"), **common)
