"""TensorFlow's 2015 InceptionV3 (the FID network of ADM's evaluator) in Flax NNX, NHWC.

The graph ``classify_image_graph_def.pb`` of ``inception-2015-12-05``, as ADM's evaluator runs
it: the float image in [0, 255] is resized to 299x299 by TF1 ``ResizeBilinear`` (no
half-pixel centres, no antialiasing), mapped to ``(x - 128) / 128``, and read at three places:

- ``pool``: ``pool_3``, the spatial mean of the last block (2048; FID, IS, precision/recall);
- ``spatial``: ``mixed_6/conv``, the 1x1 branch of ``Mixed_6d`` after its ReLU, its first 7
  channels flattened in H, W, C order (17 * 17 * 7 = 2023; sFID);
- ``logits``: ``pool_3 @ W`` with the 2048x1008 softmax weight and no bias (IS).

It differs from torchvision's InceptionV3 in 1008 classes, average pools that exclude padding
(A, C and the first E block), a max pool in the last E block, bias-free convolutions and
BatchNorm eps 1e-3. Module names are torchvision's (``Mixed_6d.branch1x1.conv``...), so the
``.pth`` files of pytorch-fid and torch-fidelity load name by name. Every convolution and
matmul runs at ``precision=HIGHEST`` (GPUs would use TF32 and TPUs bfloat16 otherwise).

``create_feature_fn`` runs the network over all devices and hosts in fixed-size batches.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils

from dit_jax import sharding
from dit_jax.weights import fetch

INPUT_SIZE = 299
POOL_DIM, SPATIAL_DIM, NUM_LOGITS = 2048, 17 * 17 * 7, 1008
SPATIAL_CHANNELS = 7  # ADM keeps the first 7 of Mixed_6d's 192 1x1-branch channels
# The registry names of the converted weights (dit_jax.weights.fetch); both hold the same tensors.
DEFAULT_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
WEIGHT_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
HIGHEST = lax.Precision.HIGHEST
RANDOM_PREFIX = "random:"  # --inception_weights random:SEED: random weights of the right shapes (a smoke test)


# --------------------------------------------------------------------------- preprocessing

def _legacy_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 ``ResizeBilinear(align_corners=False, half_pixel_centers=False)`` along one axis.

    Source coordinate = index * (in / out) in float32, as TF computes it; lower tap its floor,
    upper tap the next one clamped to the edge, weight the fractional part.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(source).astype(np.int32)
    upper = np.minimum(lower + 1, in_size - 1).astype(np.int32)
    return lower, upper, (source - np.floor(source)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=1)
def _resize_rows(images: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, ...]:
    """First stage: the two source rows of each output row, and their x-interpolation increments."""
    _, height, width, _ = images.shape
    y0, y1, _ = _legacy_bilinear_taps(height, size[0])
    x0, x1, wx = _legacy_bilinear_taps(width, size[1])
    wx = jnp.asarray(wx, images.dtype)[None, None, :, None]
    top, bottom = images[:, y0], images[:, y1]
    top_left, bottom_left = top[:, :, x0], bottom[:, :, x0]
    return top_left, bottom_left, (top[:, :, x1] - top_left) * wx, (bottom[:, :, x1] - bottom_left) * wx


@functools.partial(jax.jit, static_argnums=(4, 5))
def _resize_cols(top_left, bottom_left, dx_top, dx_bottom, height: int, out_height: int):
    """Second stage: the interpolated top and bottom rows and the y-increment."""
    _, _, wy = _legacy_bilinear_taps(height, out_height)
    top, bottom = top_left + dx_top, bottom_left + dx_bottom
    return top, (bottom - top) * jnp.asarray(wy, top.dtype)[None, :, None, None]


def resize_stages(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> tuple[jax.Array, jax.Array]:
    """TF1 bilinear resize of float ``[N, H, W, C]`` as ``(top, dy)``; the image is ``top + dy``.

    TF's kernel (``align_corners=False``, no half-pixel centres) interpolates along x, then
    y, rounding every product before its sum. XLA fuses ``a + b * c`` into one FMA (one
    rounding, results off by an ulp or two), so each product leaves its compiled program
    before it is added: the stages are separate programs, and the last sum belongs to the
    caller's (the network's). Call outside ``jit`` (inside, they would fuse again).
    """
    size = tuple(int(v) for v in size)
    return _resize_cols(*_resize_rows(images, size), images.shape[1], size[0])


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """Bit-exact TF1 ``ResizeBilinear(half_pixel_centers=False)`` (unlike ``jax.image.resize``, which
    uses half-pixel centres and antialiases when shrinking). Call outside ``jit``."""
    return _add(*resize_stages(images, size))


_add = jax.jit(jnp.add)


def preprocess(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """uint8 (or float in [0, 255]) ``[N, 299, 299, 3]`` -> the network's input ``(x - 128) / 128``."""
    return (images.astype(dtype) - 128.0) / 128.0


# --------------------------------------------------------------------------- the network

def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_padding(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1, dividing by the number of in-image pixels (TF's average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = lax.reduce_window(ones, jnp.zeros((), x.dtype), lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


class Weights:
    """The tensors a network is built from, by torch name; records every name and shape asked for.

    With ``tensors=None`` it hands out zeros (to list the expected names and shapes cheaply);
    otherwise it collects every missing or mis-shaped tensor, so one error can name them all.
    """

    def __init__(self, tensors: dict[str, np.ndarray] | None, dtype: Any = jnp.float32):
        self.tensors, self.dtype = tensors, dtype
        self.expected: dict[str, tuple[int, ...]] = {}
        self.problems: list[str] = []

    def take(self, name: str, shape: tuple[int, ...]) -> nnx.Param:
        """The tensor ``name`` of torch shape ``shape``, in NHWC layout (HWIO kernels, ``[in, out]`` linear)."""
        self.expected[name] = tuple(shape)
        value = None if self.tensors is None else self.tensors.get(name)
        if self.tensors is not None and value is None:
            self.problems.append(f"missing {name} {tuple(shape)}")
        elif value is not None and tuple(np.shape(value)) != tuple(shape):
            self.problems.append(f"{name}: shape {tuple(np.shape(value))}, expected {tuple(shape)}")
            value = None
        value = np.zeros(shape, np.float32) if value is None else np.asarray(value, np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif value.ndim == 2:
            value = value.T
        return nnx.Param(jnp.asarray(value, self.dtype))


class BasicConv2d(nnx.Module):
    """Convolution without bias, inference BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, w: Weights, name: str, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        kh, kw = _pair(kernel)
        ph, pw = _pair(padding)
        self.stride, self.padding = stride, ((ph, ph), (pw, pw))
        self.kernel = w.take(f"{name}.conv.weight", (cout, cin, kh, kw))
        self.scale, self.bias = w.take(f"{name}.bn.weight", (cout,)), w.take(f"{name}.bn.bias", (cout,))
        self.mean, self.var = w.take(f"{name}.bn.running_mean", (cout,)), w.take(f"{name}.bn.running_var", (cout,))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(x, self.kernel[...], (self.stride,) * 2, self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
        y = (y - self.mean[...]) * (self.scale[...] * lax.rsqrt(self.var[...] + 1e-3)) + self.bias[...]
        return jax.nn.relu(y)


def _convs(w: Weights, block: str) -> Callable[..., BasicConv2d]:
    return lambda name, *args, **kwargs: BasicConv2d(w, f"{block}.{name}", *args, **kwargs)


class InceptionA(nnx.Module):
    def __init__(self, w: Weights, name: str, cin: int, pool_features: int):
        conv = _convs(w, name)
        self.branch1x1 = conv("branch1x1", cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = conv("branch5x5_1", cin, 48, 1), conv("branch5x5_2", 48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv("branch3x3dbl_1", cin, 64, 1)
        self.branch3x3dbl_2 = conv("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv("branch3x3dbl_3", 96, 96, 3, padding=1)
        self.branch_pool = conv("branch_pool", cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_exclude_padding(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, w: Weights, name: str, cin: int):
        conv = _convs(w, name)
        self.branch3x3 = conv("branch3x3", cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv("branch3x3dbl_1", cin, 64, 1)
        self.branch3x3dbl_2 = conv("branch3x3dbl_2", 64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv("branch3x3dbl_3", 96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            max_pool(x, 3, 2),
        ], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, w: Weights, name: str, cin: int, c7: int):
        conv = _convs(w, name)
        self.branch1x1 = conv("branch1x1", cin, 192, 1)
        self.branch7x7_1 = conv("branch7x7_1", cin, c7, 1)
        self.branch7x7_2 = conv("branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv("branch7x7_3", c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv("branch7x7dbl_1", cin, c7, 1)
        self.branch7x7dbl_2 = conv("branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv("branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv("branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv("branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv("branch_pool", cin, 192, 1)

    def __call__(self, x: jax.Array, *, with_1x1: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        out = jnp.concatenate([b1, b7, d, self.branch_pool(avg_pool_exclude_padding(x))], axis=-1)
        return (out, b1) if with_1x1 else out


class InceptionD(nnx.Module):
    def __init__(self, w: Weights, name: str, cin: int):
        conv = _convs(w, name)
        self.branch3x3_1, self.branch3x3_2 = conv("branch3x3_1", cin, 192, 1), conv("branch3x3_2", 192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv("branch7x7x3_1", cin, 192, 1)
        self.branch7x7x3_2 = conv("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv("branch7x7x3_4", 192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
    """``pool="avg"`` (Mixed_7b, padding excluded) or ``"max"`` (Mixed_7c, as the TF graph)."""

    def __init__(self, w: Weights, name: str, cin: int, pool: str):
        conv = _convs(w, name)
        self.pool = pool
        self.branch1x1 = conv("branch1x1", cin, 320, 1)
        self.branch3x3_1 = conv("branch3x3_1", cin, 384, 1)
        self.branch3x3_2a = conv("branch3x3_2a", 384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv("branch3x3_2b", 384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv("branch3x3dbl_1", cin, 448, 1)
        self.branch3x3dbl_2 = conv("branch3x3dbl_2", 448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv("branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv("branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv("branch_pool", cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_exclude_padding(x) if self.pool == "avg" else max_pool(x, 3, 1, padding=1)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """The FID InceptionV3 built from ``Weights``; ``__call__(images)`` -> ``{"pool", "spatial", "logits"}``."""

    def __init__(self, w: Weights):
        self.dtype = w.dtype
        conv = lambda name, *a, **k: BasicConv2d(w, name, *a, **k)  # noqa: E731
        self.Conv2d_1a_3x3 = conv("Conv2d_1a_3x3", 3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv("Conv2d_2a_3x3", 32, 32, 3)
        self.Conv2d_2b_3x3 = conv("Conv2d_2b_3x3", 32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv("Conv2d_3b_1x1", 64, 80, 1)
        self.Conv2d_4a_3x3 = conv("Conv2d_4a_3x3", 80, 192, 3)
        self.Mixed_5b = InceptionA(w, "Mixed_5b", 192, 32)
        self.Mixed_5c = InceptionA(w, "Mixed_5c", 256, 64)
        self.Mixed_5d = InceptionA(w, "Mixed_5d", 288, 64)
        self.Mixed_6a = InceptionB(w, "Mixed_6a", 288)
        self.Mixed_6b = InceptionC(w, "Mixed_6b", 768, 128)
        self.Mixed_6c = InceptionC(w, "Mixed_6c", 768, 160)
        self.Mixed_6d = InceptionC(w, "Mixed_6d", 768, 160)
        self.Mixed_6e = InceptionC(w, "Mixed_6e", 768, 192)
        self.Mixed_7a = InceptionD(w, "Mixed_7a", 768)
        self.Mixed_7b = InceptionE(w, "Mixed_7b", 1280, "avg")
        self.Mixed_7c = InceptionE(w, "Mixed_7c", 2048, "max")
        # The softmax layer (torch ``fc``): ADM's logits use the weight only; the bias is read to
        # check the file and kept, unused.
        self.fc_kernel = w.take("fc.weight", (NUM_LOGITS, POOL_DIM))
        self.fc_bias = w.take("fc.bias", (NUM_LOGITS,))

    def __call__(self, images: jax.Array | tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        """uint8 (or float in [0, 255]) ``[N, 299, 299, 3]`` images -> features (``self.dtype``).

        Other sizes: resize with ``resize_bilinear_tf1`` first (outside ``jit``), or pass its
        ``resize_stages`` as ``(top, dy)``: the final sum then happens here.
        """
        if isinstance(images, tuple):
            top, dy = images
            images = top.astype(self.dtype) + dy.astype(self.dtype)
        if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"expected images [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] (NHWC RGB; resize others with "
                             f"resize_bilinear_tf1), got shape {images.shape}")
        x = preprocess(images, self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 3, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, mixed_6d_1x1 = self.Mixed_6d(x, with_1x1=True)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool = jnp.mean(x, axis=(1, 2))
        spatial = mixed_6d_1x1[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # H, W, C order
        logits = jnp.dot(pool, self.fc_kernel[...], precision=HIGHEST)
        return {"pool": pool, "spatial": spatial, "logits": logits}


# --------------------------------------------------------------------------- weights

def expected_weights() -> dict[str, tuple[int, ...]]:
    """Every tensor name of the converted weight files and its (torch) shape."""
    w = Weights(None)
    _ = InceptionV3(w)
    return dict(w.expected)


def check_weights(tensors: dict[str, np.ndarray], source: str) -> None:
    """Raise a ``ValueError`` listing every missing, unexpected or mis-shaped tensor."""
    _build(tensors, source, jnp.float32, zeros=True)


def _build(tensors: dict[str, np.ndarray], source: str, dtype: Any, zeros: bool = False) -> InceptionV3:
    w = Weights({k: (np.zeros(np.shape(v), np.float32) if zeros else v) for k, v in tensors.items()}, dtype)
    model = InceptionV3(w)
    unexpected = sorted(set(tensors) - set(w.expected) - {k for k in tensors if k.endswith("num_batches_tracked")})
    problems = w.problems + [f"unexpected {k}" for k in unexpected]
    if problems:
        more = f" ... ({len(problems)} problems)" if len(problems) > 8 else ""
        raise ValueError(f"{source} is not the FID InceptionV3 (pytorch-fid's {WEIGHT_NAMES[0]} or torch-fidelity's "
                         f"{WEIGHT_NAMES[1]}, or their .safetensors conversion): " + "; ".join(problems[:8]) + more)
    return model


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors of the FID InceptionV3's names and shapes: He-normal kernels, unit BatchNorm statistics (for
    speed measurements and smoke tests: finite activations, figures comparable with nothing)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_weights().items():
        if name.endswith(("running_var", "weight")) and len(shape) == 1:  # BatchNorm variance and scale
            tensors[name] = np.ones(shape, np.float32)
        elif len(shape) > 1:  # conv [out, in, h, w] and fc [out, in] kernels
            tensors[name] = (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)
        else:
            tensors[name] = np.zeros(shape, np.float32)
    return tensors


def random_seed(weights: str | os.PathLike | None) -> int | None:
    """The seed of ``random:SEED`` (random weights of the right shapes, a smoke test), else None."""
    if weights is None or not os.fspath(weights).startswith(RANDOM_PREFIX):
        return None
    seed = os.fspath(weights)[len(RANDOM_PREFIX):]
    if not seed.isdigit():
        raise ValueError(f"--inception_weights {weights}: write random:SEED with a whole number, e.g. random:0")
    return int(seed)


def weights_sha256(tensors: dict[str, np.ndarray]) -> str:
    """The SHA-256 of the network's tensors (every expected name in order, its shape, its float32 values):
    the same for pytorch-fid's and torch-fidelity's files and their ``.safetensors`` conversions, which hold
    the same tensors in different containers (their files' hashes differ)."""
    import hashlib

    digest = hashlib.sha256()
    for name, shape in sorted(expected_weights().items()):
        digest.update(f"{name}{tuple(shape)}".encode())
        digest.update(np.ascontiguousarray(tensors[name], "<f4").tobytes())
    return digest.hexdigest()


def read_inception_weights(weights: str | os.PathLike | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The tensors of a ``.pth``/``.safetensors`` file, of a registry name (fetched into the cache;
    default ``DEFAULT_WEIGHTS``) or of ``random:SEED`` (``random_weights``), and where they came from."""
    seed = random_seed(weights)
    if seed is not None:
        return random_weights(seed), f"{RANDOM_PREFIX}{seed}"
    name = DEFAULT_WEIGHTS if weights is None else os.fspath(weights)
    path = fetch.locate(name, WEIGHT_NAMES)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} do not exist; pass the .pth of pytorch-fid or "
                                f"torch-fidelity (or its .safetensors conversion), or a registry name "
                                f"({', '.join(WEIGHT_NAMES)})")
    return fetch.read_weights(path), os.fspath(path)


def create_inception(weights: str | os.PathLike | dict[str, np.ndarray] | None = None, *,
                     dtype: Any = jnp.float32) -> InceptionV3:
    """The network with the converted TF weights: a file path, a registry name, or a torch-named dict
    (every name and shape checked; one error lists all problems)."""
    if isinstance(weights, dict):
        return _build(weights, "the given weights", dtype)
    tensors, source = read_inception_weights(weights)
    return _build(tensors, source, dtype)


def save_safetensors(weights: str | os.PathLike | None, out: str | os.PathLike) -> str:
    """Convert the weights once (checked) to ``.safetensors``, so evaluation needs no PyTorch."""
    from safetensors.numpy import save_file

    tensors, source = read_inception_weights(weights)
    check_weights(tensors, source)
    expected = expected_weights()
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items() if k in expected}, os.fspath(out))
    return os.fspath(out)


# --------------------------------------------------------------------------- sharded features

_to_float = jax.jit(lambda images, dtype: images.astype(dtype), static_argnums=1)
FeatureFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def create_feature_fn(model: InceptionV3, *, mesh: jax.sharding.Mesh | None = None,
                      batch_size: int | None = None) -> FeatureFn:
    """``features(images) -> {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]}`` (float32 numpy).

    ``images`` are this process's uint8 ``[N, H, W, 3]`` (N may differ between processes; all
    must call together). They go through the network in fixed-size global batches of
    ``batch_size`` (default 32 per batch shard) split over the mesh's batch axes (default:
    all devices of all processes), the last one padded; only features are gathered, and every
    process gets all processes' features in process order (process 0's first), padding dropped.
    """
    mesh = sharding.create_mesh({"data": -1}) if mesh is None else mesh
    shards = sharding.batch_shards(mesh)
    batch_size = 32 * shards if batch_size is None else int(batch_size)
    local_batch = sharding.process_batch_size(batch_size, mesh)
    graphdef, state = nnx.split(model)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(state, replicated)

    @jax.jit
    def forward(state, images, ids):
        feats = nnx.merge(graphdef, state)(images)
        return {k: v.astype(jnp.float32) for k, v in feats.items()}, ids

    def run(images: jax.Array, ids: jax.Array):
        if images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):  # the resize's stages run as their own programs
            images = resize_stages(_to_float(images, model.dtype))
        return forward(state, images, ids)

    def features(images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3] (NHWC RGB), got shape {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}; convert samples with "
                             "clip(127.5 * x + 128, 0, 255).astype(uint8) as DiT's sample_ddp.py does")
        n = images.shape[0]
        counts = np.asarray(multihost_utils.process_allgather(np.array([n], np.int64))).reshape(-1)
        steps = -(-int(counts.max()) // local_batch)
        me = jax.process_index()
        outs: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
        order = []
        for step in range(steps):
            chunk = images[step * local_batch:(step + 1) * local_batch]
            ids = np.full(local_batch, -1, np.int64)
            ids[:len(chunk)] = me * int(counts.max()) + step * local_batch + np.arange(len(chunk))
            if len(chunk) < local_batch:
                chunk = np.concatenate([chunk, np.zeros((local_batch - len(chunk),) + images.shape[1:], np.uint8)])
            batch = sharding.global_batch({"images": chunk, "ids": ids.astype(np.int32)}, mesh)
            feats, gids = run(batch["images"], batch["ids"])
            feats, gids = multihost_utils.process_allgather((feats, gids), tiled=True)
            keep = np.asarray(gids) >= 0
            order.append(np.asarray(gids)[keep])
            for k in outs:
                outs[k].append(np.asarray(feats[k])[keep])
        if not order:
            return {"pool": np.zeros((0, POOL_DIM), np.float32), "spatial": np.zeros((0, SPATIAL_DIM), np.float32),
                    "logits": np.zeros((0, NUM_LOGITS), np.float32)}
        perm = np.argsort(np.concatenate(order), kind="stable")
        return {k: np.concatenate(v)[perm] for k, v in outs.items()}

    return features
