"""The grain input pipeline (synthetic images, pre-encoded latents): deterministic per seed, disjoint
shares of a global shuffle, flips, fresh latent samples, exact resume, clear errors."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest

from dit_jax import input_pipeline, latents, synthetic
from dit_jax.sampling import image_grid
from tests.run_files import LATENT_SCALE, write_latents


@pytest.fixture(scope="module")
def source():
    images, labels = synthetic.make_examples(96, num_classes=4, image_size=16, seed=3)
    return input_pipeline.ArraySource(images, labels)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_order(source):
    a = take(input_pipeline.make_train_iterator(source, batch_size=8, seed=0), 5)
    b = take(input_pipeline.make_train_iterator(source, batch_size=8, seed=0), 5)
    c = take(input_pipeline.make_train_iterator(source, batch_size=8, seed=1), 5)
    assert all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


def _source_index(data: np.ndarray, image: np.ndarray) -> tuple[int, bool]:
    """(index into the data, whether flipped) of one pipeline image."""
    for flipped, candidates in ((False, data), (True, data[:, :, ::-1])):
        hits = np.flatnonzero(np.all(candidates == image, axis=(1, 2, 3)))
        if hits.size:
            return int(hits[0]), flipped
    raise AssertionError("pipeline produced an image that is not in the data")


def test_batches_are_model_range_floats_and_flips_of_the_data(source):
    batch = next(input_pipeline.make_train_iterator(source, batch_size=32, seed=0))
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    data = image_grid.to_model_range(source.images)
    found = [_source_index(data, image) for image in batch["image"]]
    assert [source.labels[i] for i, _ in found] == list(batch["label"])
    assert 0 < sum(flipped for _, flipped in found) < 32


def test_flips_can_be_turned_off(source):
    unflipped = input_pipeline.ArraySource(source.images, source.labels, random_flip=False)
    batch = next(input_pipeline.make_train_iterator(unflipped, batch_size=32, seed=0))
    data = image_grid.to_model_range(source.images)
    found = [_source_index(data, image) for image in batch["image"]]
    assert not any(flipped for _, flipped in found)
    assert [source.labels[i] for i, _ in found] == list(batch["label"])


def test_an_epoch_is_split_between_shards(source):
    data = image_grid.to_model_range(source.images)
    halves = []
    for shard in range(2):
        it = input_pipeline.make_train_iterator(source, batch_size=8, seed=0, shard_index=shard, shard_count=2)
        epoch = np.concatenate([next(it)["image"] for _ in range(6)])  # 48 examples = this shard's epoch
        halves.append({_source_index(data, image)[0] for image in epoch})
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(96))


def test_resume_from_iterator_state(source):
    it = input_pipeline.make_train_iterator(source, batch_size=8, seed=0)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 2)
    again = input_pipeline.make_train_iterator(source, batch_size=8, seed=0)
    again.set_state(state)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(expected, take(again, 2)))


def test_global_batches_hold_the_same_examples_for_any_number_of_processes(source):
    data = image_grid.to_model_range(source.images)
    one = input_pipeline.make_train_iterator(source, batch_size=8, seed=0)
    halves = [input_pipeline.make_train_iterator(source, batch_size=4, seed=0, shard_index=i, shard_count=2)
              for i in range(2)]
    for _ in range(14):  # past an epoch boundary (96 / 8 = 12 batches)
        together = np.concatenate([next(it)["image"] for it in halves])
        assert ({_source_index(data, x)[0] for x in next(one)["image"]}
                == {_source_index(data, x)[0] for x in together})


def test_seek_positions_an_iterator_by_batch_count(source):
    expected = take(input_pipeline.make_train_iterator(source, batch_size=8, seed=0, shard_index=1, shard_count=2), 7)
    it = input_pipeline.make_train_iterator(source, batch_size=8, seed=0, shard_index=1, shard_count=2)
    input_pipeline.seek(it, 5)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(expected[5:], take(it, 2)))


def test_processes_draw_different_augmentations(source):
    """Equal seeds on every host would flip the same positions of every host's batch."""
    flips = []
    for shard in range(2):
        batch = next(input_pipeline.make_train_iterator(source, batch_size=32, seed=0, shard_index=shard,
                                                        shard_count=2))
        data = image_grid.to_model_range(source.images)
        flips.append([_source_index(data, x)[1] for x in batch["image"]])
    assert flips[0] != flips[1]


def test_bad_inputs_are_named(source):
    with pytest.raises(ValueError, match="smaller than one batch"):
        input_pipeline.make_train_iterator(source, batch_size=64, seed=0, shard_count=2)
    with pytest.raises(ValueError, match="uint8"):
        input_pipeline.ArraySource(np.zeros((4, 8, 8, 3), np.float32), np.zeros(4))
    with pytest.raises(ValueError, match="labels must have shape"):
        input_pipeline.ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(5))


# ---------------------------------------------------------------- pre-encoded latents

@pytest.fixture(scope="module")
def exact_latents(tmp_path_factory):
    """std = 0: every sample identifies its record and view exactly."""
    return latents.LatentSource(write_latents(tmp_path_factory.mktemp("exact"), 96, std=0.0))


def record_and_view(batch) -> tuple[np.ndarray, np.ndarray]:
    values = batch["image"][:, 0, 0, 0] / LATENT_SCALE
    assert np.all(batch["image"] == batch["image"][:, :1, :1, :1])  # one record's constant latent
    return np.rint(np.abs(values)).astype(int) - 1, values < 0


def test_latent_batches_are_scaled_views_of_the_records(exact_latents):
    batch = next(input_pipeline.make_train_iterator(exact_latents, batch_size=32, seed=0))
    assert batch["image"].shape == (32, 2, 2, 4) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    index, flipped = record_and_view(batch)
    assert list(batch["label"]) == list(index % 4)
    assert 8 < flipped.sum() < 24  # each view with probability 1/2


def test_latent_flips_can_be_turned_off(tmp_path):
    unflipped = latents.LatentSource(write_latents(tmp_path, 96, std=0.0), random_flip=False)
    batch = next(input_pipeline.make_train_iterator(unflipped, batch_size=32, seed=0))
    index, flipped = record_and_view(batch)
    assert not flipped.any() and list(batch["label"]) == list(index % 4)


def test_latent_epochs_are_global_permutations_split_between_hosts(exact_latents):
    epochs = []
    for shard in range(2):
        it = input_pipeline.make_train_iterator(exact_latents, batch_size=8, seed=0, shard_index=shard, shard_count=2)
        epochs.append([np.concatenate([record_and_view(next(it))[0] for _ in range(6)]) for _ in range(2)])
    for epoch in range(2):  # 48 examples per host per epoch: disjoint halves of one permutation of 96
        a, b = epochs[0][epoch], epochs[1][epoch]
        assert not set(a) & set(b) and sorted(np.concatenate([a, b])) == list(range(96))
    assert not np.array_equal(epochs[0][0], epochs[0][1])  # reshuffled every epoch
    assert not np.array_equal(np.sort(epochs[0][0]), np.arange(0, 96, 2))  # not a fixed strided share


def test_latent_order_depends_only_on_the_seed(exact_latents):
    order = lambda seed: np.concatenate([record_and_view(b)[0] for b in take(
        input_pipeline.make_train_iterator(exact_latents, batch_size=8, seed=seed), 4)])
    assert np.array_equal(order(0), order(0)) and not np.array_equal(order(0), order(1))


def test_latents_are_fresh_posterior_samples_and_resume_exactly(tmp_path):
    source = latents.LatentSource(write_latents(tmp_path, 64, std=0.5, shape=(8, 8, 4)))
    it = input_pipeline.make_train_iterator(source, batch_size=64, seed=0)
    first, second = take(it, 2)
    for batch in (first, second):
        mean = np.arange(1, 65)[:, None, None, None]  # record i sits at +-(i+1); recover it from the sample
        z = batch["image"] / LATENT_SCALE
        index = np.rint(np.abs(z).mean(axis=(1, 2, 3))).astype(int) - 1
        noise = (np.abs(z) - mean[index]) / 0.5
        assert abs(noise.mean()) < 0.05 and 0.95 < noise.std() < 1.05
    # Each epoch covers every record once, with new noise.
    assert not np.allclose(np.sort(np.abs(first["image"]).ravel()), np.sort(np.abs(second["image"]).ravel()))

    state = it.get_state()
    expected = take(it, 3)
    again = input_pipeline.make_train_iterator(source, batch_size=64, seed=0)
    again.set_state(state)
    for x, y in zip(expected, take(again, 3)):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])


def test_damaged_latent_folders_are_named(tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    write_latents(folder, 16, std=0.1)
    metadata = json.loads((folder / latents.METADATA).read_text())
    with pytest.raises(ValueError, match="corrupt latent record: 3 bytes"):
        latents.decode_records([b"abc"], (2, 2, 4), "float16")
    (folder / latents.METADATA).write_text(json.dumps({**metadata, "num_images": 17}))
    with pytest.raises(ValueError, match="the shards hold 16 records but metadata.json counts 17"):
        latents.LatentSource(str(folder))
    (folder / metadata["shards"][0]["file"]).unlink()
    with pytest.raises(latents.CorruptShardError, match="shard-00000-of-00001.array_record: missing"):
        latents.LatentSource(str(folder))


@pytest.mark.parametrize("name, fits", [("dit_xl2_256", True), ("dit_b4_256", True), ("dit_xl2_512", False)])
def test_paper_configs_read_latents_dir(tmp_path, name, fits):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.data.latents_dir = write_latents(tmp_path, 8, std=0.1, shape=(32, 32, 4))  # 256px latents
    if fits:
        assert len(input_pipeline.create_source(config)) == 8
    else:
        with pytest.raises(ValueError, match="model.input_size=64 but the latents are 32x32"):
            input_pipeline.create_source(config)
