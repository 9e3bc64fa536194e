"""``python -m dit_jax.evaluate``: the wiring of file -> features -> ADM's five figures, and bad input."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dit_jax import evaluate
from dit_jax.fid import adm_npz, features, inception, metrics
from tests.fake_images import natural_image

REPO = Path(__file__).resolve().parents[1]


def _images(seed: int, n: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([natural_image(rng, size, size) for _ in range(n)])


@pytest.mark.slow  # compiles the network twice and two 2048x2048 square roots (~5 min); the metric and reading tests are the fast ones
def test_evaluate_streams_the_files_and_computes_the_five_figures(tmp_path, inception_state):
    import torch

    torch.save(inception_state, tmp_path / "inception.pth")
    samples, reference = _images(0, 6, 32), _images(1, 5, 48)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez_compressed(tmp_path / "ref.npz", arr_0=reference)  # deflated members stream too
    result = evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"),
                               inception_weights=str(tmp_path / "inception.pth"), batch_size=8, progress=False)
    # The same figures straight from the library.
    feature_fn = inception.create_feature_fn(
        inception.create_inception({k: v.numpy() for k, v in inception_state.items()}), batch_size=8)
    s, r = feature_fn(samples), feature_fn(reference)
    expected, _ = metrics.compute_metrics(s, {"pool": r["pool"], "spatial": r["spatial"]})
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    assert result["num_samples"] == 6 and result["num_reference_images"] == 5
    assert result["settings"]["pr_distances"] == "float16" and result["settings"]["is_split_size"] == 5000
    assert any("32x32" in note and "48x48" in note for note in result["notes"])  # another resolution: said
    json.dumps(result)


def test_npz_images_read_in_chunks_from_stored_and_deflated_files(tmp_path):
    images = _images(2, 7, 16)
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez_compressed(tmp_path / "b.npz", arr_0=images)
    for name in ("a.npz", "b.npz"):
        reader = adm_npz.NpzImages(str(tmp_path / name))
        assert len(reader) == 7
        np.testing.assert_array_equal(np.concatenate(list(reader.chunks(2, 7, 2))), images[2:])


def test_bad_batches_get_clear_errors(tmp_path):
    np.savez(tmp_path / "labels.npz", arr_1=np.zeros(3))
    with pytest.raises(adm_npz.BadBatch, match="no 'arr_0'"):
        adm_npz.NpzImages(str(tmp_path / "labels.npz"))
    np.savez(tmp_path / "float.npz", arr_0=np.full((2, 8, 8, 3), np.nan, np.float32))
    with pytest.raises(adm_npz.BadBatch, match="not uint8"):
        adm_npz.NpzImages(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(adm_npz.BadBatch, match=r"\[N, H, W, 3\]"):
        adm_npz.NpzImages(str(tmp_path / "nchw.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(adm_npz.BadBatch, match="not a readable .npz"):
        adm_npz.NpzImages(str(tmp_path / "corrupt.npz"))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.full((2048, 2048), np.nan))
    with pytest.raises(adm_npz.BadBatch, match="sigma contains NaN"):
        adm_npz.read_statistics(str(tmp_path / "stats.npz"))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(adm_npz.BadBatch, match="another network"):
        adm_npz.read_statistics(str(tmp_path / "small.npz"))
    full = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "truncated.npz", arr_0=full)
    data = (tmp_path / "truncated.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(adm_npz.BadBatch):
        adm_npz.NpzImages(str(tmp_path / "truncated.npz"))


def test_a_damaged_stored_or_compressed_npz_is_named(tmp_path):
    images = _images(3, 6, 16)
    for name, save in (("stored.npz", np.savez), ("compressed.npz", np.savez_compressed)):
        save(tmp_path / name, arr_0=images)
        data = bytearray((tmp_path / name).read_bytes())
        data[len(data) // 2] ^= 0xFF  # one byte inside arr_0's data: a CRC (stored) or deflate error
        (tmp_path / name).write_bytes(bytes(data))
        reader = adm_npz.NpzImages(str(tmp_path / name))
        with pytest.raises(adm_npz.BadBatch, match=f"{tmp_path / name}: arr_0 is damaged"):
            list(reader.chunks(0, 6, 2))


@pytest.mark.parametrize("samples, reference, message", [
    (0, 10, "the samples hold 0 images; the five figures need at least 4"),
    (1, 10, "the samples hold 1 images; the five figures need at least 4"),
    (10, 1, r"the reference holds 1 images \(arr_0\); the five figures need at least 4"),
])
def test_batches_too_small_for_the_figures_are_refused_before_any_work(tmp_path, samples, reference, message):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((samples, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((reference, 8, 8, 3), np.uint8))
    with pytest.raises(adm_npz.BadBatch, match=message):  # weights that do not exist: refused before they are read
        evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"),
                          inception_weights=str(tmp_path / "no_weights.pth"), progress=False)


def test_the_command_reports_bad_input_without_a_traceback(tmp_path):
    (tmp_path / "corrupt.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    proc = subprocess.run([sys.executable, "-m", "dit_jax.evaluate", "--reference", str(tmp_path / "ref.npz"),
                           "--samples", str(tmp_path / "corrupt.npz")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 2  # the user's to fix, as every command's
    assert "corrupt.npz is not a readable .npz file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_reference_by_name_is_the_registry_file_and_offline_names_its_url(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DIT_JAX_CACHE": str(tmp_path / "cache"), "DIT_JAX_OFFLINE": "1",
           "DIT_JAX_MIRROR": "http://mirror.invalid/dit"}
    proc = subprocess.run([sys.executable, "-m", "dit_jax.evaluate", "--reference", "VIRTUAL_imagenet256_labeled.npz",
                           "--samples", "samples.npz"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "http://mirror.invalid/dit/VIRTUAL_imagenet256_labeled.npz" in line
    assert f"put it at {tmp_path / 'cache' / 'VIRTUAL_imagenet256_labeled.npz'}" in line


def test_the_module_defines_no_flags_at_import():
    from absl import flags

    import dit_jax.evaluate  # noqa: F401

    assert "samples" not in flags.FLAGS and "reference" not in flags.FLAGS


ADM_FIGURES = {"inception_score": 215.837, "fid": 3.94256, "sfid": 6.14043, "precision": 0.8265, "recall": 0.5309}


def test_adm_readme_figures_with_the_real_files():
    """ADM's README: VIRTUAL_imagenet256_labeled.npz vs admnet_guided_upsampled_imagenet256.npz (50K samples)."""
    reference, samples = os.environ.get("DIT_JAX_EVAL_REFERENCE"), os.environ.get("DIT_JAX_EVAL_SAMPLES")
    if not (reference and samples):
        pytest.skip("set DIT_JAX_EVAL_REFERENCE=VIRTUAL_imagenet256_labeled.npz and DIT_JAX_EVAL_SAMPLES="
                    "admnet_guided_upsampled_imagenet256.npz (and DIT_JAX_INCEPTION_WEIGHTS=the FID .pth if it is "
                    "not in the cache) to check ADM's published figures")
    result = evaluate.evaluate(reference, samples, inception_weights=os.environ.get("DIT_JAX_INCEPTION_WEIGHTS"))
    assert result["inception_score"] == pytest.approx(ADM_FIGURES["inception_score"], rel=5e-3)
    assert result["fid"] == pytest.approx(ADM_FIGURES["fid"], abs=2e-3)
    assert result["sfid"] == pytest.approx(ADM_FIGURES["sfid"], rel=1e-3)
    assert result["precision"] == pytest.approx(ADM_FIGURES["precision"], abs=3e-3)
    assert result["recall"] == pytest.approx(ADM_FIGURES["recall"], abs=3e-3)


# ------------------------------------------------------------------ trust: the weights' hash, the cache, random weights

@pytest.fixture
def counted_network(monkeypatch, tmp_path):
    """evaluate with the cheap stand-in features (counting the images they see) and a cache in tmp_path."""
    from tests.inception_features import fake_features

    seen = []
    monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "create_inception", lambda weights, **_: None)
    monkeypatch.setattr(inception, "create_feature_fn",
                        lambda model, **_: lambda images: (seen.append(len(images)), fake_features(images))[1])
    return seen


def test_a_second_evaluation_reads_the_reference_features_from_the_cache(tmp_path, counted_network):
    np.savez(tmp_path / "samples.npz", arr_0=_images(0, 5, 16))
    np.savez(tmp_path / "ref.npz", arr_0=_images(1, 7, 16))
    run = functools.partial(evaluate.evaluate, str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"),
                            progress=False)
    first = run(inception_weights="random:0")
    assert sum(counted_network) == 5 + 7 and "computed, kept in" in first["settings"]["reference_features"]
    counted_network.clear()
    second = run(inception_weights="random:0")
    assert sum(counted_network) == 5  # the samples only: the reference's features came from the cache
    assert second["settings"]["reference_features"].startswith("read from")
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert second[key] == first[key], key
    counted_network.clear()
    run(inception_weights="random:1")  # other weights: another entry
    assert sum(counted_network) == 5 + 7
    np.savez(tmp_path / "ref.npz", arr_0=_images(2, 7, 16))  # another file under the same name: another entry
    counted_network.clear()
    run(inception_weights="random:1")
    assert sum(counted_network) == 5 + 7
    counted_network.clear()
    run(inception_weights="random:1", cache=False)
    assert sum(counted_network) == 5 + 7
    # A smoke test says so in its notes and settings.
    assert "comparable with nothing" in first["notes"][0] and first["settings"]["smoke_test_random_weights"]
    assert first["settings"]["inception_weights"] == "random:0"
    assert first["settings"]["inception_weights_sha256"] == inception.weights_sha256(inception.random_weights(0))


def _with_statistics(path, record=None, images=None):
    arrays = dict(mu=np.zeros(inception.POOL_DIM), sigma=np.eye(inception.POOL_DIM))
    if record is not None:
        arrays["metadata"] = np.array(json.dumps({"settings": record}))
    if images is not None:
        arrays["arr_0"] = images
    np.savez(path, **arrays)
    return str(path)


def test_a_reference_records_its_weights_and_other_weights_are_refused(tmp_path):
    real = features.InceptionWeights({}, str(tmp_path / "fid.safetensors"), "a" * 64)
    random = features.InceptionWeights({}, "random:0", "b" * 64)
    adm = _with_statistics(tmp_path / "adm.npz")  # ADM's batches record no weights
    [note] = features.check_reference_weights(adm_npz.open_reference(adm), adm, real)
    assert "records no Inception weights hash (ADM's reference batches record none)" in note
    with pytest.raises(adm_npz.BadBatch, match="records no Inception weights .* random weights"):
        features.check_reference_weights(adm_npz.open_reference(adm), adm, random)
    ours = _with_statistics(tmp_path / "ours.npz", {"inception_weights": "fid.pth", "inception_weights_sha256": "a" * 64})
    assert features.check_reference_weights(adm_npz.open_reference(ours), ours, real) == []
    with pytest.raises(adm_npz.BadBatch, match=r"computed with other Inception weights \(fid.pth"):
        features.check_reference_weights(adm_npz.open_reference(ours), ours, random)
    images_only = str(tmp_path / "images.npz")  # everything computed here, with these weights: nothing to check
    np.savez(images_only, arr_0=_images(3, 4, 16))
    assert features.check_reference_weights(adm_npz.open_reference(images_only), images_only, random) == []


def test_the_command_refuses_other_weights_in_one_line(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=_images(0, 4, 16))
    ref = _with_statistics(tmp_path / "ref.npz", {"inception_weights": "pt_inception-2015-12-05-6726825d.pth",
                                                   "inception_weights_sha256": "0" * 64}, _images(1, 4, 16))
    proc = subprocess.run([sys.executable, "-m", "dit_jax.evaluate", "--reference", ref, "--samples",
                           str(tmp_path / "samples.npz"), "--inception_weights", "random:0"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = [text for text in proc.stderr.splitlines() if text.startswith("error:")]  # (JAX's own INFO aside)
    assert "computed with other Inception weights (pt_inception-2015-12-05-6726825d.pth" in line
    assert "--inception_weights random:0" in line  # how to rebuild it for these weights
