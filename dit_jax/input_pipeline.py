"""Training input: a grain pipeline of shuffled, (by default) randomly flipped, batched examples.

Examples are ``{"image": float32 [H, W, C], "label": int32}``; batches stack them. Images
are synthetic pixels in [-1, 1] or pre-encoded ImageNet latents (``latents.LatentSource``:
a fresh posterior sample of a random flip, times the VAE scale factor, at every read).
Every epoch is one global permutation from the seed; each process reads only its own share
of it (``shard_index`` of ``shard_count``, strided, so global batch ``k`` holds the same examples
whatever the number of processes), and the iterator's ``get_state``/``set_state`` let a
checkpoint resume at the exact example (``seek`` does it from a step count when the number of
processes changed).
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from dit_jax import latents, synthetic
from dit_jax.sampling import image_grid


class ArraySource:
    """In-memory uint8 images and int labels, read and augmented a batch at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, random_flip: bool = True):
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}")
        self.images, self.labels = images, labels.astype(np.int32)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.labels)

    def sample_batch(self, indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The examples at ``indices`` as one [-1, 1] float32 batch, each flipped left-right with
        probability 1/2 if ``random_flip`` (the paper's only augmentation); one gather and one draw per batch."""
        images = image_grid.to_model_range(self.images[indices])
        if self.random_flip:
            flip = rng.random(len(images)) < 0.5
            images[flip] = images[flip][:, :, ::-1]
        return {"image": images, "label": self.labels[indices]}


Source = ArraySource | latents.LatentSource
# Latent batches are made by 16 threads (reads and numpy release the GIL), at most 32 ahead:
# grain's default 500-element buffer would hold gigabytes of XL-size batches.
LATENT_READ_OPTIONS = grain.ReadOptions(num_threads=16, prefetch_buffer_size=32)


def make_train_iterator(source: Source, *, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
    """An endless iterator of batches: a new global permutation every epoch, this shard's share of it."""
    if len(source) // shard_count < batch_size:
        raise ValueError(f"the dataset share ({len(source)} examples / {shard_count} shards) is smaller "
                         f"than one batch of {batch_size}; make more data or use a smaller batch")
    # Shuffle indices; read and augment whole batches (one gather, one vectorised draw per batch).
    ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()[shard_index::shard_count]
    # Augmentation draws: one stream per process (equal seeds would repeat the same flips and
    # posterior noise on every host).
    ds = ds.batch(batch_size, drop_remainder=True).random_map(source.sample_batch, seed=seed + 1 + shard_index)
    if isinstance(source, latents.LatentSource):
        return iter(ds.to_iter_dataset(LATENT_READ_OPTIONS))  # parallel reads from the shards
    return iter(ds)


def seek(iterator: grain.DatasetIterator, batches: int) -> None:
    """Position a ``make_train_iterator`` iterator after its first ``batches`` batches.

    Every process's iterator yields one batch per training step, so the step count alone fixes
    where each one stands; this is how a run resumes on a different number of processes.
    """
    state = iterator.get_state()
    if set(state) != {"next_index"}:
        raise ValueError(f"cannot position a {type(iterator).__name__} (state {state!r}); "
                         "expected an iterator made by make_train_iterator")
    iterator.set_state({"next_index": int(batches)})


def synthetic_source(config: ml_collections.ConfigDict, *, seed: int) -> ArraySource:
    """The package's own class-conditional images (``config.data``: num_train, image_size)."""
    images, labels = synthetic.make_examples(config.data.num_train, num_classes=config.model.num_classes,
                                        image_size=config.data.image_size, seed=seed)
    return ArraySource(images, labels, random_flip=config.data.random_flip)


def latent_source(config: ml_collections.ConfigDict) -> latents.LatentSource:
    """Pre-encoded latents in ``config.data.latents_dir``, checked against ``config.model``."""
    source = latents.LatentSource(config.data.latents_dir, random_flip=config.data.random_flip,
                                  verify=config.data.verify_latents)
    h, w, c = source.shape
    m, problems = config.model, []
    if (m.input_size, m.input_size) != (h, w):
        problems.append(f"model.input_size={m.input_size} but the latents are {h}x{w} "
                        f"(from {source.metadata['resolution']}px images): use --config.model.input_size={h}")
    if m.in_channels != c:
        problems.append(f"model.in_channels={m.in_channels} but the latents have {c} channels")
    if m.num_classes < source.num_classes:
        problems.append(f"model.num_classes={m.num_classes} but the latents have {source.num_classes} classes")
    if problems:
        raise ValueError(f"the model does not fit the latents in {config.data.latents_dir}: " + "; ".join(problems))
    return source


def create_source(config: ml_collections.ConfigDict) -> Source:
    """The training data named by ``config.data.source``."""
    if config.data.source == "synthetic":
        return synthetic_source(config, seed=config.seed)
    if config.data.source == "latents":
        return latent_source(config)
    raise ValueError(f"data.source={config.data.source!r} is not available: use 'latents' (pre-encoded ImageNet, "
                     "with data.latents_dir) or 'synthetic'")
