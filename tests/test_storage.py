"""Workdirs, latents and samples in a bucket (``gs://``), against a local GCS (``conftest.fake_gcs``); and
Orbax's commit-file atomicity (``train.checkpoint_atomicity``, for gcsfuse mounts)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from PIL import Image

from dit_jax import checkpointing, latents, locking, run_log, storage, train, train_state
from dit_jax.fid import adm_npz
from dit_jax.sampling import blocks as sample_blocks, engine, image_grid
from tests.run_files import read_log
from tests.tiny_models import TINY_RUN, flat_fields, tiny_run_config

ROOT = Path(__file__).resolve().parents[1]


def fresh(gcs, name: str) -> epath.Path:
    """A folder of its own in the fake bucket (the emulator lives for the whole session)."""
    return epath.Path(gcs.url(f"{name}-{uuid.uuid4().hex[:8]}"))


def names(folder: epath.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_typed_path_resolves_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.absolute("runs/x/") == str(tmp_path / "runs" / "x")
    assert storage.absolute("~/runs/x") == str(tmp_path / "home" / "runs" / "x")
    assert storage.absolute(tmp_path / "a" / ".." / "b") == str(tmp_path / "b")
    for uri in ("gs://bucket/runs/x", "gs://bucket/runs/x/", "s3://b/~/x"):
        assert storage.absolute(uri) == uri  # a bucket path passes through unchanged


def test_atomic_writes_and_the_lock_on_gs(gcs):
    run = fresh(gcs, "run")
    storage.write_atomic(run / "a.json", '{"x": 1}')
    storage.write_atomic(run / "a.json", '{"x": 2}')  # replaced whole: one object, no temporary one
    assert json.loads((run / "a.json").read_text()) == {"x": 2} and names(run) == ["a.json"]
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"dit_jax_publish_{uuid.uuid4().hex}"
    local.write_bytes(b"\x00\x01" * 1000)
    storage.publish(local, run / "blob.bin")
    assert (run / "blob.bin").read_bytes() == b"\x00\x01" * 1000 and not local.exists()

    # The lock: created with the does-not-exist precondition, refused while held, removed on release.
    with locking.hold(os.fspath(run), purpose="training run") as lock:
        assert json.loads((run / locking.LOCK_FILE).read_text())["token"] == lock["token"]
        with pytest.raises(locking.LockHeldError, match="still running"):
            locking.acquire(os.fspath(run), purpose="training run")
        # Two commands past the existence check at once: GCS lets only the first create the object.
        with pytest.raises(locking.LockHeldError, match="locked at the same moment by training run on host"):
            locking._create(os.fspath(run / locking.LOCK_FILE), json.dumps({"token": "late"}), os.fspath(run))
    assert not (run / locking.LOCK_FILE).exists()


def test_run_logs_latents_and_evaluation_inputs_on_gs(gcs, tmp_path):
    run = fresh(gcs, "run")
    # metrics.jsonl: rewritten atomically, appended to, read back (a damaged last line dropped).
    with run_log.rewrite(run / "metrics.jsonl", [{"step": 1, "loss": 1.0}]) as log:
        log.write(json.dumps({"step": 2, "loss": 0.5}) + "\n")
        log.flush()
        log.write('{"step": 3, "lo')
    assert run_log.read_history(run / "metrics.jsonl", up_to_step=10) == [{"step": 1, "loss": 1.0},
                                                                          {"step": 2, "loss": 0.5}]
    # TensorBoard events after the restored step are dropped, as on a local disk.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    events = io.BytesIO()
    writer = RecordWriter(events)
    for step in (1, 2, 3):
        writer.write(event_pb2.Event(step=step, wall_time=float(step)).SerializeToString())
    (run / "events.out.tfevents.1.host").write_bytes(events.getvalue())
    run_log.rewind_event_files(run, 2)
    assert [e.step for e in EventFileLoader(os.fspath(run / "events.out.tfevents.1.host")).Load()] == [1, 2]

    # A latents folder in the bucket: grain reads its ArrayRecord shard straight from gs:// (array_record's
    # own GCS reader), after the size and SHA-256 checks.
    folder, rng = fresh(gcs, "latents"), np.random.default_rng(0)
    mean, std = rng.normal(size=(6, 2, 2, 2, 4)), rng.uniform(0.1, 1, size=(6, 2, 2, 2, 4))
    shard = tmp_path / "shard.array_record"
    records = ArrayRecordWriter(os.fspath(shard), "group_size:1,uncompressed")
    for i in range(6):
        records.write(latents.encode_record(i % 2, mean[i], std[i], "float16"))
    records.close()
    entry = {"file": latents.shard_name(0, 1), "num_records": 6, "bytes": shard.stat().st_size,
             "sha256": storage.sha256_file(shard)}
    storage.publish(shard, folder / entry["file"])
    storage.write_json_atomic(folder / latents.METADATA, {"num_images": 6, "latent_shape": [2, 2, 4],
                                                          "dtype": "float16", "scale_factor": 0.5,
                                                          "counts_per_class": [3, 3], "shards": [entry]})
    source = latents.LatentSource(os.fspath(folder), verify=True)
    got = source.read(np.array([5, 0, 3]))
    np.testing.assert_array_equal(got["label"], [1, 0, 1])
    np.testing.assert_array_equal(got["mean"], mean[[5, 0, 3]].astype(np.float16))
    (folder / entry["file"]).write_bytes(b"damaged")
    with pytest.raises(latents.CorruptShardError, match="7 bytes"):
        latents.LatentSource(os.fspath(folder))

    # Sample blocks and the ADM .npz streamed from them (``sample --out gs://...``), read back by evaluate.
    images, labels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), np.array([1, 0, 1], np.int32)
    blocks = os.fspath(run / "blocks")
    for start, stop in ((0, 2), (2, 3)):
        sample_blocks.write_block(blocks, engine.Block(start, images[start:stop], labels[start:stop]))
    assert sample_blocks.finished_prefix(blocks) == (3, [(0, 2), (2, 3)])
    adm_npz.write_adm_npz(os.fspath(run / "samples.npz"), sample_blocks.read_blocks(blocks, [(0, 2), (2, 3)], (8, 8, 3)),
                          (8, 8, 3), labels, {"mu": np.zeros(3)})
    batch = adm_npz.NpzImages(os.fspath(run / "samples.npz"))
    np.testing.assert_array_equal(np.concatenate(list(batch.chunks(0, 3, 2))), images)
    with pytest.raises(adm_npz.BadBatch, match="has mu without sigma"):  # read from the bucket, then checked
        adm_npz.read_statistics(os.fspath(run / "samples.npz"))
    image_grid.save_image(run / "grid.png", images[0])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO((run / "grid.png").read_bytes()))), images[0])


def test_commit_file_checkpoints_resume_and_a_step_without_its_commit_file_is_set_aside(tiny_workdir, tmp_path,
                                                                                          caplog):
    import orbax.checkpoint as ocp

    # commit_file: the step is written in place, its commit file last (a config-only step here: no arrays).
    manager = checkpointing.create_manager(str(tmp_path / "written"), every_steps=1, max_to_keep=3,
                                           atomicity="commit_file")
    try:
        manager.save(1, args=ocp.args.Composite(config=ocp.args.JsonSave({"a": 1})))
        manager.wait_until_finished()
    finally:
        manager.close()
    assert names(tmp_path / "written") == ["1"] and (tmp_path / "written" / "1" / "commit_success.txt").exists()

    # Orbax 0.12.8 writes the commit file under rename too, so a workdir may switch modes. One whose step 3 was
    # killed before its commit file: under commit_file the run resumes from step 2, and step 3 is reported and
    # set aside (not used, not deleted); under rename (auto, here) the directory's name alone commits it.
    workdir = tmp_path / "run"
    for atomicity, resumed in (("auto", 3), ("commit_file", 2)):
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(tiny_workdir, workdir)
        (workdir / "checkpoints" / "3" / "commit_success.txt").unlink()
        caplog.clear()
        assert int(restore(tiny_run_config(), workdir, atomicity, caplog).step) == resumed
    assert "unfinished write of checkpoint step 3" in caplog.text  # of the commit_file restore
    assert (workdir / "checkpoints_corrupt" / "3").is_dir() and not (workdir / "checkpoints" / "3").exists()


def restore(config, workdir, atomicity: str, caplog):
    """``checkpointing.restore_latest`` of ``workdir`` (as the trainer calls it), logging captured."""
    import jax
    import orbax.checkpoint as ocp

    from dit_jax import input_pipeline

    _, _, state = train_state.create_train_state(config)
    batches = input_pipeline.make_train_iterator(input_pipeline.create_source(config),
                                                 batch_size=config.train.batch_size, seed=config.seed)
    manager = checkpointing.create_manager(os.fspath(workdir / "checkpoints"), every_steps=1, max_to_keep=10,
                                           atomicity=atomicity)
    try:
        with caplog.at_level(logging.WARNING):
            return checkpointing.restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                                                batches, config,
                                                quarantine_dir=os.fspath(workdir / "checkpoints_corrupt"))
    finally:
        manager.close()


def test_a_bad_checkpoint_atomicity_is_named(tmp_path):
    with pytest.raises(ValueError, match="train.checkpoint_atomicity 'copy' is not one of"):
        train.train_and_evaluate(tiny_run_config(train={"checkpoint_atomicity": "copy"}), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def committed(folder: epath.Path) -> list[int]:
    """Steps of a bucket's checkpoint folder with their commit file (Orbax's commit on gs://)."""
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists())


STEPS = 8


@pytest.mark.slow  # three tiny runs, one in a bucket killed and resumed; test_*_on_gs above are the fast ones
def test_a_run_in_a_bucket_killed_and_resumed_ends_with_the_losses_of_an_uninterrupted_run(gcs, tmp_path):
    from tests.processes import main_command

    sections = {"train": {"steps": STEPS, "checkpoint_every": 2}}
    flags = [f"--config.{k}={v}" for k, v in {**flat_fields(TINY_RUN), **flat_fields(sections)}.items()]
    # The uninterrupted run, on a local disk with commit-file checkpoints (the option as on a gcsfuse mount).
    reference = tmp_path / "reference"
    train.train_and_evaluate(tiny_run_config(train={**sections["train"], "checkpoint_atomicity": "commit_file"}),
                             str(reference))
    assert all((reference / "checkpoints" / str(s) / "commit_success.txt").exists() for s in (4, 6, 8))
    run = fresh(gcs, "run")
    env = dict(os.environ)  # the fake GCS's (the gcs fixture)
    command = main_command(os.fspath(run), *flags)

    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 1800  # minutes on a loaded 2-core machine (each request to the emulator is serial)
        while not committed(run / "checkpoints") and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint was committed in the bucket within 1800 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    killed_at = max(committed(run / "checkpoints"))
    assert killed_at < STEPS and not (run / "summary.json").exists()

    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from step {killed_at}" in done.stderr, done.stderr[-3000:]
    assert "taking over the lock" in done.stderr  # the killed run's lock object, its pid gone
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "eval" not in r}
    assert losses == {r["step"]: r["loss"] for r in read_log(reference)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] == json.loads((reference / "summary.json").read_text())["final_loss"]
    assert (run / "samples.png").exists() and not (run / locking.LOCK_FILE).exists()

    # Sampling loads the run's EMA weights straight from the bucket (``--ckpt gs://...``).
    import jax
    from flax import nnx

    from dit_jax.weights.load import load_dit

    loaded, local = load_dit(os.fspath(run)), load_dit(str(reference))
    assert loaded.info["step"] == STEPS
    for x, y in zip(jax.tree.leaves(nnx.state(loaded.model)), jax.tree.leaves(nnx.state(local.model)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow  # an extraction and two tiny latent runs; the latents part of test_run_logs_..._on_gs is the fast one
def test_latents_extracted_into_a_bucket_train_as_the_local_ones(gcs, image_tree, tiny_vae_dir, tiny_latents_dir,
                                                                 tmp_path):
    from dit_jax import images, latent_extraction, vae
    from tests.tiny_models import latent_config

    out = fresh(gcs, "latents")
    metadata = latent_extraction.extract(images.FolderSource(str(image_tree)), vae.load_vae(str(tiny_vae_dir)),
                                         os.fspath(out), vae=str(tiny_vae_dir), resolution=16, images_per_shard=16,
                                         batch_size=8)
    local = storage.read_json(tiny_latents_dir / latents.METADATA)
    # The same records, byte for byte (each shard written locally, then uploaded as one object).
    assert [(s["file"], s["sha256"]) for s in metadata["shards"]] == [(s["file"], s["sha256"]) for s in local["shards"]]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / locking.LOCK_FILE).exists()
    summaries = [train.train_and_evaluate(latent_config(d), str(tmp_path / name))
                 for name, d in (("bucket", os.fspath(out)), ("local", str(tiny_latents_dir)))]
    losses = [{r["step"]: r["loss"] for r in read_log(tmp_path / name)} for name in ("bucket", "local")]
    assert losses[0] == losses[1] and len(losses[0]) == 2  # logged at steps 3 and 6
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]
