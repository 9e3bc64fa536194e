"""Small CNN that judges class consistency of generated synthetic images.

Trained on the package's own synthetic data (``dit_jax.synthetic``), it scores
how often DiT samples conditioned on class ``y`` are recognised as class ``y``.
Two training augmentations shape what the score means:

* a random hue rotation per image, so the judge recognises classes by *shape*:
  each class also has its own base hue, and a colour-sensitive judge would
  accept class-coloured blobs as correct samples;
* a random left-right flip, as in the DiT's own training data (the paper's only
  augmentation): a mirrored crescent or checkerboard is a correct sample of its class;
* random Gaussian pixel noise, so it tolerates slightly imperfect samples.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_RANGE_TOLERANCE = 1e-3  # slack on the [-1, 1] input check for float round-off


class Classifier(nnx.Module):
    """Stride-2 conv stack -> global average pool -> linear logits.

    Input: NHWC float images in [-1, 1] of size ``image_size``.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        widths: tuple[int, ...] = (32, 64, 128),
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = num_classes
        self.image_size = image_size
        channels = (3, *widths)
        self.convs = nnx.List(
            [
                nnx.Conv(c_in, c_out, (3, 3), strides=2, rngs=rngs)
                for c_in, c_out in zip(channels[:-1], channels[1:])
            ]
        )
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The pooled last-layer activations [N, widths[-1]] the logits are read from (the demo's FID space)."""
        for conv in self.convs:
            x = nnx.relu(conv(x))
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def _check_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Validate NHWC float images in [-1, 1] of the classifier's size; return float32."""
    images = np.asarray(images)
    expected = (image_size, image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"expected images of shape [N, {image_size}, {image_size}, 3], got {images.shape}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(
            f"expected float images in [-1, 1], got dtype {images.dtype} "
            "(convert uint8 with dit_jax.sampling.image_grid.to_model_range)"
        )
    if images.size and (
        not np.all(np.isfinite(images))
        or images.min() < -1 - _RANGE_TOLERANCE
        or images.max() > 1 + _RANGE_TOLERANCE
    ):
        raise ValueError(
            f"expected images in [-1, 1], got range [{images.min()}, {images.max()}]"
        )
    return images.astype(np.float32)


def _loss(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _rotate_hue(x: jax.Array, key: jax.Array) -> jax.Array:
    """Rotate each image's colours by a random angle about the gray axis.

    In [-1, 1] RGB space the gray axis passes through the origin, so this is a
    per-example 3x3 rotation (Rodrigues' formula): a random hue shift that
    keeps luminance contrast but makes the class hue useless as a cue.
    """
    theta = jax.random.uniform(key, (x.shape[0], 1, 1), maxval=2 * jnp.pi)
    axis = jnp.full((3,), 1 / jnp.sqrt(3.0))
    cross = jnp.array([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / jnp.sqrt(3.0)
    rot = (
        jnp.cos(theta) * jnp.eye(3)
        + jnp.sin(theta) * cross
        + (1 - jnp.cos(theta)) * jnp.outer(axis, axis)
    )
    return jnp.clip(jnp.einsum("bij,bhwj->bhwi", rot, x), -1.0, 1.0)


def _train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    params: nnx.State,
    opt_state: optax.OptState,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
) -> tuple[nnx.State, optax.OptState, jax.Array]:
    """One Adam step on a hue-rotated, flipped, noise-augmented batch; pure in (params, opt_state)."""
    hue_key, flip_key, sigma_key, noise_key = jax.random.split(key, 4)
    x = _rotate_hue(x, hue_key)
    flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    sigma = jax.random.uniform(sigma_key, (x.shape[0], 1, 1, 1), maxval=0.2)
    x = x + sigma * jax.random.normal(noise_key, x.shape)
    loss, grads = jax.value_and_grad(_loss, argnums=1)(graphdef, params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    steps: int = 400,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> Classifier:
    """Train a ``Classifier`` on float NHWC images in [-1, 1] with integer labels.

    Batches are sampled with replacement from ``images``; the result is
    deterministic per ``seed``.
    """
    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps}, {batch_size}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty image batch [N, H, W, 3], got {images.shape}")
    images = _check_images(images, images.shape[1])
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape ({images.shape[0]},), "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )

    model = Classifier(num_classes=num_classes, image_size=images.shape[1], rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 10 + 1, steps)
    optimizer = optax.adam(schedule)
    opt_state = optimizer.init(params)
    train_step = jax.jit(partial(_train_step, graphdef, optimizer), donate_argnums=(0, 1))

    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    for _ in range(steps):
        idx = rng.integers(0, images.shape[0], batch_size)
        key, step_key = jax.random.split(key)
        params, opt_state, _ = train_step(
            params, opt_state, images[idx], labels[idx].astype(np.int32), step_key
        )
    return nnx.merge(graphdef, params)


@partial(jax.jit, static_argnums=0)
def _predict_batch(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array) -> jax.Array:
    return jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=0)
def _features_batch(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).features(x)


def _batched(fn, classifier: Classifier, images: np.ndarray, batch_size: int, empty: np.ndarray) -> np.ndarray:
    images = _check_images(images, classifier.image_size)
    graphdef, params = nnx.split(classifier)
    out = [np.asarray(fn(graphdef, params, images[i : i + batch_size])) for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(out) if out else empty


def predict(classifier: Classifier, images: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """Predicted class ids (int32 ``[N]``) for float NHWC images in [-1, 1]."""
    return _batched(_predict_batch, classifier, images, batch_size, np.zeros((0,), np.int32))


def features(classifier: Classifier, images: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """``Classifier.features`` (float32 ``[N, width]``) of float NHWC images in [-1, 1]."""
    width = classifier.head.in_features
    return _batched(_features_batch, classifier, images, batch_size, np.zeros((0, width), np.float32))


def accuracy(classifier: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` (float NHWC in [-1, 1]) classified as ``labels``."""
    labels = np.asarray(labels)
    if labels.shape != (np.shape(images)[0],):
        raise ValueError(f"labels must have shape ({np.shape(images)[0]},), got {labels.shape}")
    if labels.size == 0:
        raise ValueError("accuracy needs at least one example")
    return float(np.mean(predict(classifier, images) == labels))
