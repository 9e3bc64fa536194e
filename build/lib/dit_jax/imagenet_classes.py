"""ImageNet-1k's classes in the official numbering: index -> WordNet synset id and a readable name.

The index is the sorted synset order (torchvision's ImageFolder on ``train/``, TensorFlow Datasets'
``imagenet2012``, and so the labels DiT was trained on). ``imagenet_classes.tsv`` (package data,
one ``synset<TAB>name`` line per class) pairs the synset ids of TensorFlow Datasets'
``imagenet2012/labels.txt`` with the short names torchvision lists for its ImageNet weights.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 1000


class ImageNetClass(NamedTuple):
    synset: str
    name: str


@functools.cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 classes, index = class label."""
    text = resources.files("dit_jax").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    classes = tuple(ImageNetClass(*line.split("\t")) for line in text.splitlines())
    if len(classes) != NUM_CLASSES:
        raise RuntimeError(f"dit_jax/imagenet_classes.tsv lists {len(classes)} classes, not {NUM_CLASSES}: "
                           "the installed package is damaged; reinstall dit_jax")
    return classes


def describe_labels(labels: np.ndarray | list[int], num_classes: int = NUM_CLASSES) -> str:
    """One line per label, ``207  n02099601  golden retriever``; a model of another class count gets its indices only."""
    if num_classes != NUM_CLASSES:
        return "\n".join(f"{int(label):4d}  (a {num_classes}-class model: not ImageNet's classes)" for label in labels)
    classes = imagenet_classes()
    return "\n".join(f"{int(label):4d}  {classes[int(label)].synset}  {classes[int(label)].name}" for label in labels)
