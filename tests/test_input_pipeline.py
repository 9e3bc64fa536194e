"""The grain input pipeline: deterministic per seed, disjoint shards, flips, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from dit_jax import input_pipeline, synthetic


@pytest.fixture(scope="module")
def source():
    images, labels = synthetic.generate(96, num_classes=4, image_size=16, seed=3)
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
    data = synthetic.to_model_range(source.images)
    found = [_source_index(data, image) for image in batch["image"]]
    assert [source.labels[i] for i, _ in found] == list(batch["label"])
    assert 0 < sum(flipped for _, flipped in found) < 32


def test_an_epoch_visits_each_example_of_the_shard_once(source):
    data = synthetic.to_model_range(source.images)
    for shard in range(2):
        it = input_pipeline.make_train_iterator(source, batch_size=8, seed=0, shard_index=shard, shard_count=2)
        epoch = np.concatenate([next(it)["image"] for _ in range(6)])  # 48 examples = this shard's epoch
        indices = sorted(_source_index(data, image)[0] for image in epoch)
        assert indices == list(range(shard, 96, 2))


def test_resume_from_iterator_state(source):
    it = input_pipeline.make_train_iterator(source, batch_size=8, seed=0)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 2)
    again = input_pipeline.make_train_iterator(source, batch_size=8, seed=0)
    again.set_state(state)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(expected, take(again, 2)))


def test_bad_inputs_are_named(source):
    with pytest.raises(ValueError, match="smaller than one batch"):
        input_pipeline.make_train_iterator(source, batch_size=64, seed=0, shard_count=2)
    with pytest.raises(ValueError, match="uint8"):
        input_pipeline.ArraySource(np.zeros((4, 8, 8, 3), np.float32), np.zeros(4))
    with pytest.raises(ValueError, match="labels must have shape"):
        input_pipeline.ArraySource(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(5))
