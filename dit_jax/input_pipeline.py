"""Training input: a grain pipeline of shuffled, randomly flipped, batched examples.

Examples are ``{"image": float32 [H, W, C] in [-1, 1], "label": int32}``; batches stack them.
Each process reads only its own share (``shard_index`` of ``shard_count``), and the
iterator's ``get_state``/``set_state`` let a checkpoint resume at the exact example.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from dit_jax import synthetic


class ArraySource:
    """A random-access grain source over in-memory uint8 images and int labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}")
        self.images, self.labels = images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


def _to_float_random_flip(example: dict, rng: np.random.Generator) -> dict:
    """uint8 -> [-1, 1] float32, flipped left-right with probability 1/2 (the paper's only augmentation)."""
    image = synthetic.to_model_range(example["image"])
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "label": example["label"]}


def make_train_iterator(source: ArraySource, *, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
    """An endless iterator of batches: reshuffled every epoch from ``seed``, this shard's share only."""
    if len(source) // shard_count < batch_size:
        raise ValueError(f"the dataset share ({len(source)} examples / {shard_count} shards) is smaller "
                         f"than one batch of {batch_size}; make more data or use a smaller batch")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    ds = ds.shuffle(seed=seed).repeat().random_map(_to_float_random_flip, seed=seed + 1)
    return iter(ds.batch(batch_size, drop_remainder=True))


def synthetic_source(config: ml_collections.ConfigDict, *, seed: int) -> ArraySource:
    """The package's own class-conditional images (``config.data``: num_train, image_size)."""
    images, labels = synthetic.generate(config.data.num_train, num_classes=config.model.num_classes,
                                        image_size=config.data.image_size, seed=seed)
    return ArraySource(images, labels)


def create_source(config: ml_collections.ConfigDict) -> ArraySource:
    """The training data named by ``config.data.source``."""
    if config.data.source == "synthetic":
        return synthetic_source(config, seed=config.seed)
    raise ValueError(f"data.source={config.data.source!r} is not available: use 'synthetic' (the ImageNet "
                     "latent pipeline, data.source='latents' with data.latents_dir, is not part of this release yet)")
