"""Tests for the synthetic class-conditional dataset (dit_jax.synthetic)."""
import colorsys
import time

import numpy as np
import pytest

from dit_jax import synthetic
from dit_jax.synthetic import CLASS_NAMES, MAX_CLASSES, make_examples

# Foreground shapes are bright (HSV value >= 0.8), backgrounds dark (value <= 0.28).
FG_THRESHOLD = 140


@pytest.fixture(scope="module")
def dataset():
    return make_examples(2400, num_classes=MAX_CLASSES, seed=3)


def test_shapes_dtypes_and_ranges():
    images, labels = make_examples(50, num_classes=7, image_size=24, seed=1)
    assert images.shape == (50, 24, 24, 3) and images.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 7
    assert images.min() < 60 and images.max() > 200  # dark backgrounds, bright shapes


def test_deterministic_per_seed_and_seed_sensitive():
    a_images, a_labels = make_examples(64, seed=5)
    b_images, b_labels = make_examples(64, seed=5)
    assert a_images.tobytes() == b_images.tobytes()
    assert np.array_equal(a_labels, b_labels)
    c_images, c_labels = make_examples(64, seed=6)
    assert not np.array_equal(a_labels, c_labels)
    # Even for identical labels, the jitter must differ between seeds.
    assert np.abs(a_images.astype(int) - c_images.astype(int)).mean() > 10


def test_class_balance_and_shuffle():
    _, labels = make_examples(103, num_classes=10, seed=0)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 10 and counts.max() - counts.min() <= 1
    assert not np.array_equal(labels, np.arange(103) % 10)


def test_class_names():
    assert len(CLASS_NAMES) == MAX_CLASSES >= 10
    assert len(set(CLASS_NAMES)) == MAX_CLASSES


def test_shapes_mostly_inside_image(dataset):
    images, _ = dataset
    fg = images.max(axis=-1) > FG_THRESHOLD
    area = fg.mean(axis=(1, 2))
    assert area.min() > 0.05, "every image should show a sizeable shape"
    border = np.zeros(fg.shape[1:], bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    on_border = (fg & border).sum(axis=(1, 2)) / fg.sum(axis=(1, 2))
    assert on_border.mean() < 0.03 and on_border.max() < 0.25


def _centred(mask: np.ndarray) -> np.ndarray:
    """Roll a foreground mask so its bounding box is centred (removes position jitter)."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    shift = (size // 2 - (ys.min() + ys.max()) // 2, size // 2 - (xs.min() + xs.max()) // 2)
    return np.roll(mask, shift, axis=(0, 1))


def test_classes_differ_in_shape_not_only_colour(dataset):
    """Per-class mean (centred) foreground masks are far apart compared with sampling noise."""
    images, labels = dataset
    masks = np.stack([_centred(m) for m in images.max(axis=-1) > FG_THRESHOLD]).astype(float)
    halves = []
    for cls in range(MAX_CLASSES):
        members = masks[labels == cls]
        half = len(members) // 2
        halves.append((members[:half].mean(0), members[half:].mean(0)))
    within = max(np.abs(a - b).mean() for a, b in halves)
    between = min(
        np.abs(halves[i][0] - halves[j][1]).mean()
        for i in range(MAX_CLASSES)
        for j in range(MAX_CLASSES)
        if i != j
    )
    assert between > 2 * within


def test_jitter_within_class(dataset):
    """Position, size and colour vary within a class; hue stays near the class hue."""
    images, labels = dataset
    for cls in range(MAX_CLASSES):
        members = images[labels == cls]
        fg = members.max(axis=-1) > FG_THRESHOLD
        ys, xs = np.indices(fg.shape[1:])
        area = fg.sum(axis=(1, 2))
        cx = (fg * xs).sum(axis=(1, 2)) / area
        assert cx.std() > 1.0 and area.std() / area.mean() > 0.05  # +-2.5 px shifts, radius 31-36%
        colours = np.stack([m[f].mean(0) for m, f in zip(members, fg)]) / 255.0
        assert colours.std(axis=0).max() > 0.02
        hues = np.array([colorsys.rgb_to_hsv(*c)[0] for c in colours])
        offset = (hues - cls / MAX_CLASSES + 0.5) % 1.0 - 0.5
        assert np.abs(offset).max() < 0.06, CLASS_NAMES[cls]


def test_other_image_sizes():
    for size in (16, 48):
        images, _ = make_examples(12, image_size=size, seed=0)
        assert images.shape == (12, size, size, 3)
        assert (images.max(axis=-1) > FG_THRESHOLD).mean() > 0.05


def test_vectorised_speed():
    start = time.perf_counter()
    make_examples(5000, seed=0)
    # ~0.25 s when vectorised; a per-pixel Python loop would take minutes.
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_examples=0), "num_examples"),
        (dict(num_examples=-3), "num_examples"),
        (dict(num_examples=4, image_size=15), "image_size"),
        (dict(num_examples=4, num_classes=1), "num_classes"),
        (dict(num_examples=4, num_classes=MAX_CLASSES + 1), str(MAX_CLASSES)),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.make_examples(**kwargs)

