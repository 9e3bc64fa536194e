"""Latent extraction end to end on a small image tree with bad files and a tiny random VAE.

Checks what is stored (posterior mean/std of each image and its flip), the skip report,
shard integrity, resumption after a SIGKILL, idempotence, and a short training run on the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from array_record.python.array_record_module import ArrayRecordReader

from dit_jax import images, input_pipeline, latent_extraction, latents, locking, train, vae
from tests.fake_images import IGNORED, ODD_FILES, make_flat_folder
from tests.processes import free_port, run_processes
from tests.tiny_models import latent_config
from tests.torch_references import tiny_torch_vae

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(resolution=16, images_per_shard=6, batch_size=4)  # 29 files -> 5 shards, 2 batches each


@pytest.fixture(scope="module")
def model(tiny_vae_dir):
    return vae.load_vae(str(tiny_vae_dir))


@pytest.fixture(scope="module")
def extracted(image_tree, model, tiny_vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    metadata = latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(out),
                                         vae=str(tiny_vae_dir), **SETTINGS)
    return out, metadata


def file_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_metadata_counts_and_skip_report(extracted, tiny_vae_dir):
    out, metadata = extracted
    assert metadata == json.loads((out / latents.METADATA).read_text())
    assert metadata["num_source_images"] == 29 and metadata["num_images"] == 27
    assert metadata["counts_per_class"] == [9, 9, 9]  # 8 + grey; 8 + alpha, corrupt; 8 + cmyk, truncated
    assert metadata["latent_shape"] == [8, 8, 4] and metadata["dtype"] == "float16"
    assert metadata["scale_factor"] == 0.18215 and metadata["resolution"] == 16
    weights = tiny_vae_dir / "diffusion_pytorch_model.safetensors"
    assert metadata["vae"] == str(tiny_vae_dir) and metadata["vae_weights"] == {
        "file": weights.name, "bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "hub_revision": None}
    assert metadata["encoding"]["batch_size"] == 8 and metadata["encoding"]["devices_per_process"] == 8
    ignored = {i["key"]: i["reason"] for i in metadata["ignored"]}
    assert sorted(ignored) == sorted(IGNORED) and metadata["num_ignored"] == len(IGNORED)
    assert all(ignored[k].startswith(v) for k, v in IGNORED.items())
    assert metadata["source"]["class_names"] == ["n01", "n02", "n03"]
    skipped = {s["key"]: s["reason"] for s in metadata["skipped"]}
    assert sorted(skipped) == sorted(k for k, v in ODD_FILES.items() if v == "skip") == sorted(
        k for k in ODD_FILES if "corrupt" in k or "truncated" in k)
    assert "truncated" in skipped["n03/truncated.JPEG"] and metadata["num_skipped"] == 2
    assert skipped["n02/corrupt.JPEG"] == "UnidentifiedImageError: not an image format PIL can read"
    converted = {k: mode for mode, keys in metadata["converted_to_rgb"].items() for k in keys}
    assert converted == {k: v for k, v in ODD_FILES.items() if v != "skip"}


def test_shards_are_complete_and_nothing_temporary_is_left(extracted):
    out, metadata = extracted
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(metadata["shards"]) == 5
    for shard in metadata["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        reader = ArrayRecordReader(str(out / shard["file"]))
        assert reader.num_records() == shard["num_records"]
        records = latents.decode_records(reader.read_all(), (8, 8, 4), "float16")
        reader.close()
        assert np.all(np.isfinite(records["mean"])) and np.all(records["std"] > 0)
    assert sum(s["num_records"] for s in metadata["shards"]) == 27


def test_records_hold_the_posterior_of_each_image_and_its_flip(extracted, image_tree, model):
    out, metadata = extracted
    source = images.FolderSource(str(image_tree))
    skipped = {s["key"] for s in metadata["skipped"]}
    kept = [(key, label) for key, label in source.files if key not in skipped]
    records = latents.LatentSource(str(out)).read(np.arange(27))
    assert list(records["label"]) == [label for _, label in kept]
    pixels = np.stack([images.preprocess((image_tree / key).read_bytes(), 16)[0] for key, _ in kept])
    x = jnp.asarray(pixels, jnp.float32) / 127.5 - 1
    for view, batch in enumerate((x, x[:, :, ::-1])):
        mean, logvar = model.encode(batch)
        np.testing.assert_allclose(records["mean"][:, view].astype(np.float32), mean, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(records["std"][:, view].astype(np.float32), np.exp(0.5 * logvar),
                                   rtol=2e-3, atol=1e-4)
    # The flip's latent is a different encoding, not a mirrored copy of the image's.
    assert not np.allclose(records["mean"][:, 1], records["mean"][:, 0][:, :, ::-1], atol=1e-2)


def test_rerun_on_finished_output_does_nothing_and_a_relative_vae_path_is_the_same_vae(
        extracted, image_tree, model, tiny_vae_dir, monkeypatch, tmp_path):
    out, metadata = extracted
    before = file_times(out)
    monkeypatch.chdir(tiny_vae_dir.parent)  # --vae=tiny_vae0 here is the same folder as its absolute path
    again = latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(out), vae=tiny_vae_dir.name,
                                      **SETTINGS)
    assert again == metadata and file_times(out) == before
    monkeypatch.setenv("HOME", str(out.parent))  # ~/, relative and trailing-slash forms of the same --out
    for form in (f"~/{out.name}/", os.path.relpath(out)):
        assert latent_extraction.extract(images.FolderSource(str(image_tree)), model, form, vae=tiny_vae_dir.name,
                                         **SETTINGS) == metadata
    monkeypatch.setenv("HOME", str(tiny_vae_dir.parent))  # --vae=~/tiny_vae0 too
    assert latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(out),
                                     vae=f"~/{tiny_vae_dir.name}", **SETTINGS) == metadata
    assert file_times(out) == before and not (tiny_vae_dir.parent / "~").exists()
    # A file that is not read appearing in the image folder changes nothing that is encoded: no refusal.
    tree = tmp_path / "train"
    shutil.copytree(image_tree, tree)
    (tree / "notes.txt").write_text("added later")
    copy = tmp_path / "latents"
    shutil.copytree(out, copy)
    plan = json.loads((copy / latents.PLAN).read_text())
    (copy / latents.PLAN).write_text(json.dumps({**plan, "source": {**plan["source"], "root": str(tree)}}))
    latent_extraction.extract(images.FolderSource(str(tree)), model, str(copy), vae=str(tiny_vae_dir), **SETTINGS)


@pytest.mark.parametrize("change, message", [
    ({"resolution": 32}, "differs in latent_shape: was [8, 8, 4], now [16, 16, 4]; resolution: was 16, now 32"),
    ({"batch_size": 16}, "differs in encoding.batch_size: was 8, now 16 (records encoded in batches of another "
                         "size or on other devices differ in the last bit"),
])
def test_other_settings_never_mix_into_an_existing_folder(extracted, image_tree, model, tiny_vae_dir, change,
                                                          message):
    out, _ = extracted
    before = file_times(out)
    with pytest.raises(FileExistsError, match=re.escape(message)) as refusal:
        latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(out), vae=str(tiny_vae_dir),
                                  **{**SETTINGS, **change})
    assert "--resolution=16" in str(refusal.value) and "--batch_size=8" in str(refusal.value)  # how to resume
    assert file_times(out) == before


def test_other_weights_in_the_same_vae_folder_are_refused_naming_both(model, tiny_vae_dir, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(tiny_vae_dir, folder)
    tree, out = make_flat_folder(tmp_path / "images"), tmp_path / "latents"
    latent_extraction.extract(images.FolderSource(str(tree)), model, str(out), vae=str(folder), **SETTINGS)
    old = hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    tiny_torch_vae(seed=1).save_pretrained(folder)  # e.g. -mse copied over -ema
    new = hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match=f'vae_weights.sha256: was "{old}", now "{new}"'):
        latent_extraction.extract(images.FolderSource(str(tree)), model, str(out), vae=str(folder), **SETTINGS)


def test_the_hub_revision_is_recorded_where_the_folder_knows_it(tiny_vae_dir, tmp_path):
    weights = "diffusion_pytorch_model.safetensors"
    local = tmp_path / "local-dir"  # as `hf download --local-dir` leaves it: the commit in a metadata file
    shutil.copytree(tiny_vae_dir, local)
    (local / ".cache/huggingface/download").mkdir(parents=True)
    (local / f".cache/huggingface/download/{weights}.metadata").write_text("0123abcd\n\"etag\"\n1700000000.0\n")
    snapshot = tmp_path / "models--stabilityai--sd-vae-ft-ema/snapshots/89ab"  # the Hugging Face cache
    shutil.copytree(tiny_vae_dir, snapshot)
    for folder, revision in ((local, "0123abcd"), (snapshot, "89ab"), (tiny_vae_dir, None)):
        name, described = latent_extraction.describe_vae(str(folder))
        assert name == str(folder) and described["hub_revision"] == revision and described["file"] == weights


def test_importing_the_command_defines_no_flags():
    assert not {"images", "out", "vae", "verify", "tfds_name"} & set(flags.FLAGS)


@pytest.mark.parametrize("field", ["batch_size", "images_per_shard", "resolution"])
@pytest.mark.parametrize("value", [0, -1])
def test_bad_numbers_are_rejected_before_anything_is_written(image_tree, model, tiny_vae_dir, tmp_path, field,
                                                             value):
    with pytest.raises(ValueError, match=f"{field}={value}: each must be a whole number of at least 1"):
        latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(tmp_path / "out"),
                                  vae=str(tiny_vae_dir), **{**SETTINGS, field: value})
    assert not (tmp_path / "out").exists()


def test_a_folder_of_only_bad_files_fails_and_is_never_finished(model, tiny_vae_dir, tmp_path):
    tree, out = tmp_path / "images", tmp_path / "latents"
    tree.mkdir()
    for name in ("a.png", "b.JPEG"):
        (tree / name).write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="none of the 2 images could be encoded.*a.png: UnidentifiedImageError"):
        latent_extraction.extract(images.FolderSource(str(tree)), model, str(out), vae=str(tiny_vae_dir), **SETTINGS)
    assert not (out / latents.METADATA).exists()
    # The rerun (here the command, started with dit_jax.main's multi-process flags) fails the same way.
    rerun = subprocess.run([sys.executable, "-m", "dit_jax.extract_latents", f"--images={tree}", f"--out={out}",
                            f"--vae={tiny_vae_dir}", "--resolution=16", "--images_per_shard=6", "--batch_size=8",
                            "--coordinator_address=localhost:1", "--num_processes=1", "--process_id=0"],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert rerun.returncode != 0 and "none of the 2 images could be encoded" in rerun.stderr, rerun.stderr[-2000:]
    assert not (out / latents.METADATA).exists()
    with pytest.raises(FileNotFoundError, match=r"has not finished \(1 of 1 shards done\); run `python -m "
                                                r"dit_jax.extract_latents --images="):
        latents.read_metadata(str(out))


def test_a_second_extractor_on_the_same_out_folder_refuses_naming_the_first(image_tree, model, tiny_vae_dir,
                                                                             tmp_path):
    out = tmp_path / "latents"
    first = locking.acquire(str(out), purpose="latent extraction")  # as the first extractor (alive: this process)
    with pytest.raises(locking.LockHeldError, match=f"in use by latent extraction on host .*pid {os.getpid()}"):
        latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(out), vae=str(tiny_vae_dir),
                                  **SETTINGS)
    assert sorted(p.name for p in out.iterdir()) == [locking.LOCK_FILE]  # nothing written
    locking.release(str(out), first)


def test_the_loader_names_an_empty_or_missing_latents_folder(extracted, tmp_path):
    metadata = json.loads((extracted[0] / latents.METADATA).read_text())
    (tmp_path / latents.METADATA).write_text(json.dumps({**metadata, "num_images": 0, "shards": []}))
    with pytest.raises(ValueError, match="holds no latents: none of its 29 source images could be encoded"):
        latents.LatentSource(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="latents folder .*nowhere does not exist: make it with"):
        latents.LatentSource(str(tmp_path / "nowhere"))


def test_a_truncated_metadata_json_is_named_and_a_rerun_writes_it_again(extracted, image_tree, model, tiny_vae_dir,
                                                                        tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(extracted[0], out)
    metadata = out / latents.METADATA
    metadata.write_text(metadata.read_text()[:100])
    with pytest.raises(ValueError, match=rf"^{metadata} is damaged \(not valid JSON: .*\); rerun the extraction on "):
        latents.LatentSource(str(out))
    rewritten = latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(out), vae=str(tiny_vae_dir),
                                          **SETTINGS)
    assert rewritten == extracted[1] and latents.LatentSource(str(out)).metadata == extracted[1]


def test_damaged_shards_are_named_and_a_rerun_with_verify_encodes_only_them(extracted, image_tree, model,
                                                                           tiny_vae_dir, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(extracted[0], out)
    original = latents.LatentSource(str(out)).read(np.arange(27))
    truncated, flipped = out / "shard-00001-of-00005.array_record", out / "shard-00003-of-00005.array_record"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(latents.CorruptShardError, match=r"1 damaged shard\(s\): shard-00001-of-00005.array_record: "
                                                        rf"{len(data) // 2} bytes, but {len(data)} were written"
                                                        r".*Repair: run `python -m dit_jax.extract_latents .*--verify"):
        latents.LatentSource(str(out))
    truncated.write_bytes(data)

    def flip(path: Path, offset: int) -> bytes:
        data = bytearray(path.read_bytes())
        data[offset:offset + 64] = bytes(b ^ 0xFF for b in data[offset:offset + 64])
        path.write_bytes(bytes(data))
        return bytes(data)

    last_block = out / "shard-00004-of-00005.array_record"
    intact = last_block.read_bytes()
    flip(last_block, len(intact) - 2**16 + 64)  # in the file's last 64 KiB block: its index, read at open
    with pytest.raises(latents.CorruptShardError, match="shard-00004-of-00005.array_record: opening it failed"):
        latents.LatentSource(str(out))
    last_block.write_bytes(intact)
    data = flip(flipped, 3000)  # in a record: the same size, other bytes
    config = latent_config(str(out))
    config.data.verify_latents = True  # the trainer's option
    with pytest.raises(latents.CorruptShardError, match="shard-00003-of-00005.array_record: its SHA-256 differs"):
        input_pipeline.create_source(config)
    source = latents.LatentSource(str(out))  # the cheap check (sizes) passes; reading the shard names it
    with pytest.raises(latents.CorruptShardError, match=r"1 damaged shard\(s\): shard-00003-of-00005.array_record: "
                                                        "reading it failed .*hash mismatch"):
        source.read(np.arange(27))

    truncated.write_bytes(truncated.read_bytes()[:100])
    before = file_times(out)
    metadata = latent_extraction.extract(images.FolderSource(str(image_tree)), model, str(out), vae=str(tiny_vae_dir),
                                         verify=True, **SETTINGS)
    after = file_times(out)
    changed = sorted(n for n in after if before.get(n) != after[n])
    assert changed == ["metadata.json", "shard-00001-of-00005.array_record", "shard-00001-of-00005.array_record.damaged",
                       "shard-00001-of-00005.json", "shard-00003-of-00005.array_record",
                       "shard-00003-of-00005.array_record.damaged", "shard-00003-of-00005.json"], changed
    assert (out / "shard-00003-of-00005.array_record.damaged").read_bytes() == bytes(data)  # the evidence is kept
    assert metadata == extracted[1]  # the same bytes again: same batch size and devices
    repaired = latents.LatentSource(str(out), verify=True).read(np.arange(27))
    assert repaired.tobytes() == original.tobytes()


def test_killed_run_resumes_to_the_same_result_on_several_devices(extracted, image_tree, tiny_vae_dir, tmp_path):
    """SIGKILL a 2-device run blocked mid-shard (on a FIFO), resume it, compare with the clean 1-device run."""
    tree = tmp_path / "train"
    shutil.copytree(image_tree, tree)
    blocker = tree / "n03/img0.JPEG"  # file 20 of 29: in shard 3, after shards 0-2 are done
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "dit_jax.extract_latents", f"--images={tree}", f"--out={out}",
               f"--vae={tiny_vae_dir}", "--resolution=16", "--images_per_shard=6", "--batch_size=4"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = out / "shard-00002-of-00005.json"
    deadline = time.time() + 120
    while not done.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert done.exists(), process.stderr.read().decode()[-2000:] if process.poll() is not None else "timed out"
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (out / latents.METADATA).exists() and not (out / "shard-00003-of-00005.json").exists()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        latents.read_metadata(str(out))
    finished = {n: t for n, t in file_times(out).items() if n.startswith(("shard-00000", "shard-00001", "shard-00002"))}

    blocker.unlink()
    shutil.copy(image_tree / "n03/img0.JPEG", blocker)
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "taking over the lock" in resumed.stderr and "that process is no longer running" in resumed.stderr
    assert "encoding 11 images in 2 shards (of 5) on 2 device(s)" in resumed.stderr
    assert {n: t for n, t in file_times(out).items() if n in finished} == finished  # not redone

    clean_dir, clean = extracted
    metadata = latents.read_metadata(str(out))
    different = {k for k in clean if clean[k] != metadata.get(k)}
    assert different == {"source", "encoding", "shards"}, different  # the source's path; 2 devices, not 8
    # Encoded on other devices in other batches, the records differ in their last bits: the checksums differ.
    assert [{**s, "sha256": None} for s in metadata["shards"]] == [{**s, "sha256": None} for s in clean["shards"]]
    ours, reference = (latents.LatentSource(str(d)).read(np.arange(27)) for d in (out, clean_dir))
    assert np.array_equal(ours["label"], reference["label"])
    np.testing.assert_allclose(ours["mean"].astype(np.float32), reference["mean"].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(ours["std"].astype(np.float32), reference["std"].astype(np.float32), atol=2e-3)


@pytest.mark.slow
def test_two_processes_started_as_for_training_share_the_shards(extracted, image_tree, tiny_vae_dir, tmp_path):
    """--coordinator_address/--num_processes/--process_id as for training: each process encodes its shards."""
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "dit_jax.extract_latents", f"--images={image_tree}", f"--out={out}",
               f"--vae={tiny_vae_dir}", "--resolution=16", "--images_per_shard=6", "--batch_size=8",
               f"--coordinator_address=localhost:{free_port()}", "--num_processes=2"]
    run_processes([[*command, f"--process_id={i}"] for i in range(2)], timeout=600)
    metadata = latents.read_metadata(str(out))
    assert metadata["num_images"] == 27 and metadata["encoding"]["devices_per_process"] == 4
    writers = [json.loads((out / s["file"].replace(".array_record", ".json")).read_text())["process"]
               for s in metadata["shards"]]
    assert writers == [0, 1, 0, 1, 0]
    ours, reference = (latents.LatentSource(str(d), verify=True).read(np.arange(27)) for d in (out, extracted[0]))
    assert np.array_equal(ours["label"], reference["label"])
    np.testing.assert_allclose(ours["mean"].astype(np.float32), reference["mean"].astype(np.float32), atol=2e-3)


def straight_latent_run(extracted, workdir: Path) -> list[dict]:
    """A 6-step training run on the extracted latents; its log lines."""
    summary = train.train_and_evaluate(latent_config(str(extracted[0])), str(workdir))
    assert summary["steps"] == 6
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_short_training_run_reads_the_latents(extracted, tmp_path):
    history = straight_latent_run(extracted, tmp_path)
    assert [h["step"] for h in history] == [3, 6] and all(np.isfinite(h["loss"]) for h in history)


@pytest.mark.slow  # three runs; test_input_pipeline's resume of the latent loader is the fast sibling
def test_a_latent_run_stopped_and_rerun_reads_the_same_examples(extracted, tmp_path):
    """Stopped after 3 steps and rerun: the checkpoint holds the loader's position, so the resumed run reads
    the same examples (and the same posterior samples and flips) as the straight one."""
    history = straight_latent_run(extracted, tmp_path / "straight")
    split = tmp_path / "split"
    first_half = latent_config(str(extracted[0]))
    first_half.train.steps = 3
    train.train_and_evaluate(first_half, str(split))
    resumed = train.train_and_evaluate(latent_config(str(extracted[0])), str(split))
    assert resumed["resumed_from_step"] == 3
    split_history = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in split_history] == [h["loss"] for h in history]


@pytest.mark.parametrize("field, value, message", [
    ("input_size", 16, "model.input_size=16 but the latents are 8x8"),
    ("in_channels", 3, "model.in_channels=3 but the latents have 4 channels"),
    ("num_classes", 2, "model.num_classes=2 but the latents have 3 classes"),
])
def test_model_that_does_not_fit_the_latents_is_named(extracted, field, value, message):
    c = latent_config(str(extracted[0]))
    c.model[field] = value
    with pytest.raises(ValueError, match=message):
        input_pipeline.create_source(c)


def test_missing_latents_dir_says_how_to_make_one(tmp_path):
    c = latent_config("")
    with pytest.raises(ValueError, match="python -m dit_jax.extract_latents"):
        input_pipeline.create_source(c)
    c.data.latents_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a latents folder"):
        input_pipeline.create_source(c)


@pytest.mark.parametrize("case, change, message", [
    ("missing folder", {"images": "{tmp}/no_such_folder"}, "{tmp}/no_such_folder"),
    ("bad VAE", {"vae": "{tmp}"}, "{tmp}"),
    ("bad number", {"batch_size": "0"}, "batch_size=0: each must be a whole number of at least 1"),
    ("changed settings", {"out": "{extracted}", "resolution": "32"}, "holds another extraction; it differs in "
                                                                     "latent_shape"),
    ("busy folder", {}, "is in use by latent extraction on host"),
])
def test_each_user_error_of_the_command_is_one_line_and_status_2(extracted, image_tree, tiny_vae_dir, tmp_path, case,
                                                                 change, message):
    values = {"images": str(image_tree), "out": str(tmp_path / "latents"), "vae": str(tiny_vae_dir),
              "resolution": "16", "images_per_shard": "6", "batch_size": "4"}
    fill = lambda text: text.format(tmp=tmp_path, extracted=extracted[0])
    values.update({k: fill(v) for k, v in change.items()})
    if case == "busy folder":
        locking.acquire(values["out"], purpose="latent extraction")  # held by this (live) process
    proc = subprocess.run([sys.executable, "-m", "dit_jax.extract_latents", *(f"--{k}={v}" for k, v in values.items())],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("error: ") and fill(message) in last, proc.stderr[-3000:]
