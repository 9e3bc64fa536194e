"""``python -m dit_jax.reference_batch``: an ADM reference batch from an image folder, streamed and resumable."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit_jax import evaluate, images, reference_builder
from dit_jax.fid import adm_npz, features as fid_features, metrics
from tests.fake_images import ODD_FILES, natural_image
from tests.inception_features import fake_features

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
features = functools.partial(fake_features, adm_sizes=True)


def crops_of(tree: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every readable image of the tree (source order), ADM-cropped in one pass: keys, crops, labels."""
    source = images.FolderSource(str(tree))
    rows = [images.crop_record(r, SIZE) for r in source.records(0, len(source))]
    good = [r for r in rows if not isinstance(r[1], str)]
    return [r[0] for r in good], np.stack([r[1] for r in good]), np.array([r[2] for r in good])


def build(tree: Path, out: Path, **kwargs):
    kwargs = {"image_size": SIZE, "keep_images": 8, "batch_size": 5, "save_every": 2, "progress": False, **kwargs}
    return reference_builder.build(images.FolderSource(str(tree)), str(out), kwargs.pop("features", features), **kwargs)


def read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_streamed_statistics_equal_one_pass_and_evaluate_reads_the_file(image_tree, tmp_path):
    summary = build(image_tree, tmp_path / "ref.npz")
    keys, crops, labels = crops_of(image_tree)
    ref = read(tmp_path / "ref.npz")
    # The running float64 sums give what evaluate computes from all the images at once.
    for feats, mu, sigma in (("pool", "mu", "sigma"), ("spatial", "mu_s", "sigma_s")):
        one_pass_mu, one_pass_sigma = metrics.statistics(features(crops)[feats])
        np.testing.assert_allclose(ref[mu], one_pass_mu, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ref[sigma], one_pass_sigma, rtol=1e-9, atol=1e-14)
    assert ref["sigma"].shape == (2048, 2048) and ref["sigma_s"].shape == (2023, 2023)
    # arr_0: the seeded subset of 8 of the 29 files (27 readable crops), in source order, with their labels.
    n = len(images.FolderSource(str(image_tree)))
    kept = reference_builder.kept_indices(n, 8, 0)
    all_keys = [r[0] for r in images.FolderSource(str(image_tree)).records(0, n)]
    picked = [keys.index(all_keys[i]) for i in kept if all_keys[i] in keys]
    np.testing.assert_array_equal(ref["arr_0"], crops[picked])
    np.testing.assert_array_equal(ref["arr_1"], labels[picked])
    assert len(set(ref["arr_1"].tolist())) > 1  # a random subset, not the first folder's first 8 images
    # The corrupt and truncated files are named, never fatal.
    metadata = json.loads(str(ref["metadata"]))
    assert sorted(s["key"] for s in metadata["skipped"]) == sorted(k for k, v in ODD_FILES.items() if v == "skip")
    assert summary["num_images"] == len(crops) == metadata["num_images"] and summary["num_skipped"] == 2
    # What evaluate reads: the statistics (checked shapes, no NaN) and arr_0 streamed.
    stats = adm_npz.read_statistics(str(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(stats["sigma_s"], ref["sigma_s"])
    reader = adm_npz.NpzImages(str(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(np.concatenate(list(reader.chunks(0, len(reader), 3))), ref["arr_0"])
    assert not (tmp_path / "ref.npz.partial").exists()


class Killed(Exception):
    pass


def test_an_interrupted_build_resumes_to_the_same_file(image_tree, tmp_path, monkeypatch):
    build(image_tree, tmp_path / "whole.npz")
    calls = {"n": 0}

    def dies_at_the_fourth_batch(batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return features(batch)

    with pytest.raises(Killed):  # saved after the second batch of 5 images
        build(image_tree, tmp_path / "ref.npz", features=dies_at_the_fourth_batch)
    partial = tmp_path / "ref.npz.partial"
    with np.load(partial / reference_builder.STATE) as state:
        assert json.loads(str(state["meta"]))["next"] == 10 and not (tmp_path / "ref.npz").exists()
    assert sorted(os.listdir(partial / "blocks")) == ["00000000-00000005.npz"]  # kept images 0, 1, 2, 6, 8
    # Killed again between writing the kept images' block and the state that counts them.
    real_save = reference_builder._Progress.save

    def dies_saving(self, partial):
        raise Killed

    monkeypatch.setattr(reference_builder._Progress, "save", dies_saving)
    with pytest.raises(Killed):
        build(image_tree, tmp_path / "ref.npz")
    assert sorted(os.listdir(partial / "blocks")) == ["00000000-00000005.npz", "00000005-00000008.npz"]
    monkeypatch.setattr(reference_builder._Progress, "save", real_save)
    # Other settings are refused, naming the old and new values.
    with pytest.raises(FileExistsError, match="keep_images: was 8, now 9"):
        build(image_tree, tmp_path / "ref.npz", keep_images=9)
    build(image_tree, tmp_path / "ref.npz")
    whole, resumed = read(tmp_path / "whole.npz"), read(tmp_path / "ref.npz")
    assert sorted(whole) == sorted(resumed)
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    assert not (tmp_path / "ref.npz.partial").exists()
    # A finished file is left alone; another setting on it is refused, never overwritten.
    assert build(image_tree, tmp_path / "ref.npz")["complete_already"]
    with pytest.raises(FileExistsError, match="image_size: was 32, now 16"):
        build(image_tree, tmp_path / "ref.npz", image_size=16)


def test_a_damaged_kept_image_block_is_found_at_the_start_and_only_it_is_cropped_again(image_tree, tmp_path):
    build(image_tree, tmp_path / "whole.npz")
    calls = {"n": 0}

    def dies_at(batch: int):
        def features_until(images_batch):
            calls["n"] += 1
            if calls["n"] == batch:
                raise Killed
            return features(images_batch)
        return features_until

    with pytest.raises(Killed):  # saved after the second batch: kept images 0..4 in one block
        build(image_tree, tmp_path / "ref.npz", features=dies_at(4))
    blocks = tmp_path / "ref.npz.partial" / "blocks"
    block = blocks / "00000000-00000005.npz"
    good = block.read_bytes()
    block.write_bytes(good[:len(good) // 2])
    calls["n"] = 0
    with pytest.raises(Killed):  # dies at the first batch of the resumed run: the block was redone before it
        build(image_tree, tmp_path / "ref.npz", features=dies_at(1))
    assert sorted(os.listdir(blocks)) == ["00000000-00000005.npz", "00000000-00000005.npz.damaged"]
    with np.load(block) as redone, np.load(io.BytesIO(good)) as original:
        np.testing.assert_array_equal(redone["images"], original["images"])
        np.testing.assert_array_equal(redone["labels"], original["labels"])
    build(image_tree, tmp_path / "ref.npz")
    whole, resumed = read(tmp_path / "whole.npz"), read(tmp_path / "ref.npz")
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)


def test_out_resolves_relative_and_home_forms(image_tree, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert build(image_tree, "~/ref.npz", keep_images=2)["out"] == str(home / "ref.npz")
    assert (home / "ref.npz").is_file() and not (work / "~").exists()
    assert build(image_tree, "../home/ref.npz", keep_images=2) == {"out": str(home / "ref.npz"),
                                                                   "complete_already": True}


def test_too_few_images_and_an_empty_folder_get_clear_errors(tmp_path):
    (tmp_path / "one").mkdir()
    Image.fromarray(natural_image(np.random.default_rng(0), 40, 40)).save(tmp_path / "one" / "a.png")
    (tmp_path / "one" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"only 1 of the 2 images could be read.*b.png"):
        build(tmp_path / "one", tmp_path / "ref.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        build(tmp_path / "empty", tmp_path / "ref2.npz")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0; workers must be >= 1, got 0"):
        build(tmp_path / "one", tmp_path / "ref3.npz", batch_size=0, workers=0)
    (tmp_path / "theirs.npz").write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match="theirs.npz exists and cannot be read"):
        build(tmp_path / "one", tmp_path / "theirs.npz")
    assert (tmp_path / "theirs.npz").read_bytes() == b"someone else's file"


def test_the_command_names_a_missing_folder_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dit_jax.reference_batch", "--images", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "ref.npz")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == 2, proc.stderr  # the user's to fix, as every command's
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "nowhere' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_command_records_the_weights_hash_and_evaluate_reads_it_back(tmp_path):
    """End to end on 5 tiny images with random Inception weights (their forward stood in by ``fake_features``):
    the file records the tensors' SHA-256; evaluate accepts those weights and refuses others before reading an
    image (the slow test below runs the network and computes the figures)."""
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(natural_image(rng, 20, 20)).save(tmp_path / "images" / f"{i}.png")
    out = str(tmp_path / "ref.npz")
    proc = subprocess.run([sys.executable, "-m", "tests.inception_features", "dit_jax.reference_batch", "--images",
                           str(tmp_path / "images"), "--out", out, "--image_size", "16", "--inception_weights",
                           "random:0"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"wrote {out}: statistics of 5 images, 5 in arr_0, 0 skipped"
    ours = fid_features.read_weights("random:0")
    reference = adm_npz.open_reference(out)
    assert reference.weights["inception_weights_sha256"] == ours.sha256
    assert json.loads(str(read(Path(out))["metadata"]))["settings"]["inception_weights_sha256"] == ours.sha256
    assert fid_features.check_reference_weights(reference, out, ours) == []  # what evaluate checks, passed
    with pytest.raises(adm_npz.BadBatch, match=rf"other Inception weights \(random:0, tensors SHA-256 "
                                               rf"{ours.sha256[:16]}\.\.\.\) than random:1"):
        evaluate.evaluate(out, out, inception_weights="random:1", progress=False)


@pytest.mark.slow  # the real (random-weight) network twice and two 2048x2048 square roots: minutes
def test_evaluate_against_the_same_images_gives_fid_zero(image_tree, tmp_path, inception_state):
    import torch

    torch.save(inception_state, tmp_path / "inception.pth")
    proc = subprocess.run([sys.executable, "-m", "dit_jax.reference_batch", "--images", str(image_tree),
                           "--out", str(tmp_path / "ref.npz"), "--image_size", str(SIZE), "--batch_size", "16",
                           "--inception_weights", str(tmp_path / "inception.pth")], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    _, crops, _ = crops_of(image_tree)
    assert f"statistics of {len(crops)} images" in proc.stdout
    np.savez(tmp_path / "samples.npz", arr_0=crops)
    result = evaluate.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"),
                               inception_weights=str(tmp_path / "inception.pth"), progress=False)
    assert abs(result["fid"]) < 1e-3 and abs(result["sfid"]) < 1e-3, result
    assert result["settings"]["reference_statistics"] == "precomputed mu/sigma/mu_s/sigma_s"
