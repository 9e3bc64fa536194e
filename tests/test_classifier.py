"""Tests for the class-consistency judge (dit_jax.classifier)."""
import jax
import numpy as np
import pytest
from flax import nnx

from dit_jax import classifier
from dit_jax.sampling.image_grid import to_model_range
from dit_jax.synthetic import CLASS_NAMES, make_examples

NUM_CLASSES = 10


def _data(num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = make_examples(num_examples, num_classes=NUM_CLASSES, seed=seed)
    return to_model_range(images), labels


@pytest.fixture(scope="module")
def train_data():
    return _data(4000, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return _data(1000, seed=1)


@pytest.fixture(scope="module")
def judge(train_data):
    images, labels = train_data
    # Fewer steps than the default keeps the test fast while still showing the property.
    return classifier.train_classifier(images, labels, num_classes=NUM_CLASSES, steps=200)


def test_held_out_accuracy(judge, held_out):
    assert classifier.accuracy(judge, *held_out) >= 0.95


def test_judges_shape_not_colour(judge, held_out):
    """Recolouring (swapping RGB channels) moves hues onto other classes' hues."""
    images, labels = held_out
    assert classifier.accuracy(judge, images[..., ::-1], labels) >= 0.9
    assert classifier.accuracy(judge, np.roll(images, 1, axis=-1), labels) >= 0.9


def test_recognises_mirrored_shapes(judge, held_out):
    """The DiT trains on randomly flipped data, so a mirrored crescent is still a crescent."""
    images, labels = held_out
    chiral = np.isin(labels, [CLASS_NAMES.index("crescent"), CLASS_NAMES.index("checkerboard")])
    assert chiral.sum() >= 150
    assert classifier.accuracy(judge, images[chiral][:, :, ::-1], labels[chiral]) >= 0.9


def test_robust_to_mild_noise(judge, held_out):
    images, labels = held_out
    noise = 0.15 * np.random.default_rng(0).standard_normal(images.shape, dtype=np.float32)
    assert classifier.accuracy(judge, np.clip(images + noise, -1, 1), labels) >= 0.9


def test_shuffled_labels_do_not_generalise(train_data, held_out):
    images, labels = train_data
    shuffled = np.random.default_rng(0).permutation(labels)
    model = classifier.train_classifier(images, shuffled, num_classes=NUM_CLASSES, steps=100)
    assert classifier.accuracy(model, *held_out) < 0.3


def test_predict_shape_dtype_and_batching(judge, held_out):
    images, _ = held_out
    preds = classifier.predict(judge, images[:50])
    assert preds.shape == (50,) and preds.dtype == np.int32
    assert preds.min() >= 0 and preds.max() < NUM_CLASSES
    assert np.array_equal(classifier.predict(judge, images[:50], batch_size=7), preds)


def test_accuracy_matches_predictions(judge, held_out):
    images, labels = held_out
    images, labels = images[:40], labels[:40].copy()
    labels[:10] = (classifier.predict(judge, images[:10]) + 1) % NUM_CLASSES
    expected = np.mean(classifier.predict(judge, images) == labels)
    assert classifier.accuracy(judge, images, labels) == pytest.approx(expected)
    assert expected <= 0.75


def test_training_is_deterministic(train_data):
    images, labels = train_data[0][:256], train_data[1][:256]
    runs = [
        classifier.train_classifier(images, labels, num_classes=NUM_CLASSES, steps=3, seed=s)
        for s in (4, 4, 5)
    ]
    params = [[np.asarray(p) for p in jax.tree.leaves(nnx.state(run, nnx.Param))] for run in runs]
    assert all(np.array_equal(a, b) for a, b in zip(params[0], params[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(params[0], params[2]))


@pytest.mark.parametrize(
    "bad_images, match",
    [
        (np.zeros((4, 32, 32, 3), np.uint8), "float"),
        (np.full((4, 32, 32, 3), 255.0, np.float32), r"\[-1, 1\]"),
        (np.full((4, 32, 32, 3), np.nan, np.float32), r"\[-1, 1\]"),
        (np.zeros((4, 3, 32, 32), np.float32), "shape"),
        (np.zeros((4, 16, 16, 3), np.float32), "shape"),
        (np.zeros((32, 32, 3), np.float32), "shape"),
    ],
)
def test_predict_rejects_bad_images(judge, bad_images, match):
    with pytest.raises(ValueError, match=match):
        classifier.predict(judge, bad_images)


def test_train_rejects_bad_inputs(train_data):
    images, labels = train_data[0][:8], train_data[1][:8]
    with pytest.raises(ValueError, match="labels"):
        classifier.train_classifier(images, labels[:5], num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="labels"):
        classifier.train_classifier(images, labels + NUM_CLASSES, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="float"):
        classifier.train_classifier(
            (images * 127.5 + 127.5).astype(np.uint8), labels, num_classes=NUM_CLASSES
        )
    with pytest.raises(ValueError, match="steps"):
        classifier.train_classifier(images, labels, num_classes=NUM_CLASSES, steps=0)


def test_accuracy_rejects_mismatched_labels(judge, held_out):
    images, labels = held_out
    with pytest.raises(ValueError, match="labels"):
        classifier.accuracy(judge, images[:10], labels[:9])
