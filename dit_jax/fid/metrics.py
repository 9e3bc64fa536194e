"""The metrics of ADM's evaluator (FID, sFID, Inception Score, precision, recall), as pure functions.

Inputs are features from ``dit_jax.fid.inception`` (``pool`` [N, 2048], ``spatial``
[N, 2023], ``logits`` [N, 1008]) or precomputed statistics. What decides exactness (see
``shared/specs/evaluator.md``):

- statistics: ``mu = mean``, ``sigma = np.cov(rowvar=False)``, in float64;
- Fréchet distance ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)`` with the square root
  in float64 (``scipy.linalg.sqrtm``; retried with 1e-6 on both diagonals if not finite; the
  real part kept, an imaginary diagonal above 1e-3 is an error);
- Inception Score over contiguous splits of 5,000 (the last one may be shorter), no shuffle;
- improved precision/recall with k = 3: distances in blocks of 10,000 computed in float16 as
  ADM's TensorFlow graph does on a GPU (every square rounded to float16, sums accumulated in
  float32, float16 norms and dot products; see ``_distance_block``), the whole block again in
  float32 if one is not finite; a point's radius its 4th smallest distance to its own set
  (itself included), membership by ``<=``. ``float16=False`` computes them in float32.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

SPLIT_SIZE = 5000  # Inception Score split
PR_BLOCK = 10000  # rows/columns of one distance block
PR_K = 3  # neighbourhood size: radius = distance to the k-th neighbour (k + 1 smallest with itself)
FD_EPS = 1e-6
_PAD = 256


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of ``[N, D]`` features in float64 (``np.cov`` with ``rowvar=False``, N - 1)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature vectors [N, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningMoments:
    """``mu`` and ``np.cov(rowvar=False)`` of feature rows seen in batches, in float64 about a fixed shift.

    Sums of ``x - shift`` and ``(x - shift)(x - shift)^T`` (the shift: the first batch's mean)
    keep the covariance's subtraction well conditioned over millions of rows.
    """

    def __init__(self, dim: int):
        self.count, self.shift = 0, np.zeros(dim)
        self.sum, self.outer = np.zeros(dim), np.zeros((dim, dim))

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float64)
        if not len(rows):
            return
        if not self.count:
            self.shift = rows.mean(axis=0)
        centred = rows - self.shift
        self.count += len(rows)
        self.sum += centred.sum(axis=0)
        self.outer += centred.T @ centred

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sum / self.count
        return self.shift + mean, (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_count": np.int64(self.count), f"{prefix}_shift": self.shift, f"{prefix}_sum": self.sum,
                f"{prefix}_outer": self.outer}

    def restore(self, state: Any, prefix: str) -> None:
        self.count = int(state[f"{prefix}_count"])
        self.shift, self.sum, self.outer = (np.asarray(state[f"{prefix}_{k}"]) for k in ("shift", "sum", "outer"))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FD_EPS) -> float:
    """The Fréchet distance between two Gaussians, as ADM computes it (float64 matrix square root)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (a reference of other features?)")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Fréchet distance: the product of covariances is singular; adding {eps} to both diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if imaginary > 1e-3:
            raise ValueError(f"Fréchet distance: the matrix square root has an imaginary diagonal component "
                             f"{imaginary:.3g} (> 1e-3): the statistics are not valid covariances")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # scipy warns on singular input; the caller checks finiteness itself
        warnings.simplefilter("ignore")
        return scipy.linalg.sqrtm(matrix)


def inception_score(logits: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """Mean over contiguous splits of ``split_size`` of exp(mean_i KL(p_i || mean p)), p = softmax(logits)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"Inception Score needs logits [N, classes], got shape {logits.shape}")
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for start in range(0, len(p), split_size):
        part, log_part = p[start:start + split_size], log_p[start:start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = part * (log_part - np.log(part.mean(axis=0, keepdims=True)))
        # p log p -> 0 as p -> 0: a probability that underflows to exactly 0 adds nothing (not 0 * inf = NaN).
        kl = np.sum(np.where(part > 0, terms, 0.0), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- precision / recall

def _f16(x: jax.Array) -> jax.Array:
    """Round float64 ``x`` to the nearest float16 value as IEEE float16 arithmetic does (ties to even,
    overflow to inf, subnormals kept: ``reduce_precision`` alone flushes them to zero, and XLA's
    float64 -> float16 conversion rounds twice, through float32), kept in float64."""
    normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
    subnormal = jnp.round(x * 2.0 ** 24) * 2.0 ** -24  # float16's subnormal step is 2^-24
    return jnp.where(jnp.abs(x) < 2.0 ** -14, subnormal, normal)


def _f32(x: jax.Array) -> jax.Array:
    """Round float64 ``x`` to the nearest float32 value, kept in float64."""
    return x.astype(jnp.float32).astype(jnp.float64)


@functools.partial(jax.jit, static_argnames=("float16",))
def _distance_block(u: jax.Array, v: jax.Array, *, float16: bool) -> jax.Array:
    """``max(|u|^2 - 2 u.v + |v|^2, 0)`` for rows ``u`` against rows ``v`` (ADM's orientation).

    float16 (under x64) emulates ADM's TensorFlow graph on a GPU step by step, each float64
    intermediate holding the exact result before its rounding: the inputs rounded to float16;
    ``tf.square`` rounds every square to float16; ``reduce_sum`` accumulates those in float32
    and keeps a float16 norm; the matmul multiplies float16 values exactly and accumulates in
    float32 (cuBLAS), its result float16; then ``2 * dot`` (inf past 65504, which sends the
    block to float32), the subtraction and the addition, each a float16 operation. The float32
    accumulations are modelled as correctly rounded (an exact float64 sum rounded once): a GPU
    sums in its own order, which can move a float32 result by an ulp or so and, rarely, its
    float16 rounding. float32: the same formula in float32 (sums at HIGHEST precision).
    ``tf.maximum(D, 0)`` (NaN propagating since TF 2.4, as ``jnp.maximum``) turns -inf into 0:
    a ``2 * dot`` that overflows against finite norms gives distances of 0, still float16; only
    +inf or NaN (norms past 65504, or two summing past it) send the block to float32.
    Returns float32.
    """
    if float16:
        u, v = _f16(u.astype(jnp.float64)), _f16(v.astype(jnp.float64))
        norm_u = _f16(_f32(jnp.sum(_f16(u * u), axis=1)))
        norm_v = _f16(_f32(jnp.sum(_f16(v * v), axis=1)))
        dot = _f16(_f32(jnp.dot(u, v.T, precision="highest")))
        d = _f16(_f16(norm_u[:, None] - _f16(2.0 * dot)) + norm_v[None, :])
    else:
        u, v = u.astype(jnp.float32), v.astype(jnp.float32)
        norm_u, norm_v = jnp.sum(u * u, axis=1), jnp.sum(v * v, axis=1)
        d = norm_u[:, None] - 2.0 * jnp.dot(u, v.T, precision="highest") + norm_v[None, :]
    return jnp.maximum(d, 0.0).astype(jnp.float32)


def _pr_device() -> jax.Device:
    """Where distance blocks run: the default device, or the CPU on TPUs (no float64 there)."""
    device = jax.local_devices()[0]
    return jax.local_devices(backend="cpu")[0] if device.platform == "tpu" else device


def pairwise_distances(u: np.ndarray, v: np.ndarray, *, float16: bool = True) -> np.ndarray:
    """One distance block as ADM's ``DistanceBlock``: float16 unless a value is not finite, then float32."""
    n, m = len(u), len(v)
    # Zero rows pad both sides to multiples of _PAD, so a few block shapes compile, not one per remainder.
    u, v = (np.pad(np.asarray(a, np.float32), ((0, -len(a) % _PAD), (0, 0))) for a in (u, v))
    with jax.enable_x64(True), jax.default_device(_pr_device()):
        u, v = jnp.asarray(u), jnp.asarray(v)
        d = np.asarray(_distance_block(u, v, float16=float16))[:n, :m]
        if float16 and not np.isfinite(d).all():
            d = np.asarray(_distance_block(u, v, float16=False))[:n, :m]
    return d


def manifold_radii(features: np.ndarray, *, k: int = PR_K, block: int = PR_BLOCK, float16: bool = True) -> np.ndarray:
    """Each point's distance to its k-th nearest neighbour in its own set (itself counted: the (k+1)-th smallest)."""
    features = np.asarray(features, np.float32)
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall need more than k = {k} points per set, got {n}")
    radii = np.empty(n, np.float32)
    for r0 in range(0, n, block):
        rows = features[r0:r0 + block]
        dist = np.concatenate([pairwise_distances(rows, features[c0:c0 + block], float16=float16)
                               for c0 in range(0, n, block)], axis=1)
        radii[r0:r0 + block] = np.partition(dist, k, axis=1)[:, k]
    return radii


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, *, k: int = PR_K,
                     block: int = PR_BLOCK, float16: bool = True,
                     ref_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision (samples inside the reference manifold) and recall (reference inside the samples').

    Distances between the sets are computed with reference rows against sample columns, as
    ADM does (it matters in float16, where the formula is not symmetric in rounding).
    """
    ref, samples = np.asarray(ref_features, np.float32), np.asarray(sample_features, np.float32)
    if ref.ndim != 2 or samples.ndim != 2 or ref.shape[1] != samples.shape[1]:
        raise ValueError(f"feature sets do not match: {ref.shape} vs {samples.shape}")
    ref_radii = manifold_radii(ref, k=k, block=block, float16=float16) if ref_radii is None else ref_radii
    sample_radii = manifold_radii(samples, k=k, block=block, float16=float16)
    sample_in = np.zeros(len(samples), bool)  # inside the reference manifold
    ref_in = np.zeros(len(ref), bool)  # inside the sample manifold
    for r0 in range(0, len(ref), block):
        for c0 in range(0, len(samples), block):
            d = pairwise_distances(ref[r0:r0 + block], samples[c0:c0 + block], float16=float16)
            sample_in[c0:c0 + block] |= (d <= ref_radii[r0:r0 + block, None]).any(axis=0)
            ref_in[r0:r0 + block] |= (d <= sample_radii[None, c0:c0 + block]).any(axis=1)
    return float(sample_in.mean()), float(ref_in.mean())


# ----------------------------------------------------------------------------- all five

def compute_metrics(sample_feats: dict[str, np.ndarray], reference: dict[str, Any], *,
                    split_size: int = SPLIT_SIZE, pr_float16: bool = True) -> tuple[dict[str, float], list[str]]:
    """ADM's five figures from sample features and a reference (``mu, sigma, mu_s, sigma_s`` and/or
    ``pool, spatial`` features of its images), and notes on what could not be computed or is not comparable.

    Returns ``({"inception_score", "fid", "sfid", "precision", "recall"} (those computable), notes)``.
    """
    notes: list[str] = []
    out: dict[str, float] = {}
    n = len(sample_feats["pool"])
    out["inception_score"] = inception_score(sample_feats["logits"], split_size)
    if n < 2:
        notes.append(f"FID and sFID need at least 2 samples, got {n}")
    else:
        for key, feats, mu_key, sigma_key in (("fid", "pool", "mu", "sigma"), ("sfid", "spatial", "mu_s", "sigma_s")):
            ref_stats = _reference_stats(reference, feats, mu_key, sigma_key)
            if ref_stats is None:
                notes.append(f"{key}: the reference has neither {mu_key}/{sigma_key} nor images")
                continue
            out[key] = frechet_distance(*statistics(sample_feats[feats]), *ref_stats)
    ref_pool = reference.get("pool")
    if ref_pool is None:
        notes.append("precision/recall: the reference has no images (arr_0)")
    elif n <= PR_K or len(ref_pool) <= PR_K:
        notes.append(f"precision/recall need more than {PR_K} images in each set (samples {n}, reference "
                     f"{len(ref_pool)}); not computed")
    else:
        if n < len(ref_pool):
            notes.append(f"precision/recall: {n} samples against {len(ref_pool)} reference images; ADM uses at least "
                         "as many samples as reference images, so these figures are not comparable with published ones")
        out["precision"], out["recall"] = precision_recall(ref_pool, sample_feats["pool"], float16=pr_float16)
    return out, notes


def _reference_stats(reference: dict[str, Any], feats: str, mu_key: str, sigma_key: str):
    if reference.get(mu_key) is not None and reference.get(sigma_key) is not None:
        return reference[mu_key], reference[sigma_key]
    if reference.get(feats) is not None and len(reference[feats]) >= 2:
        return statistics(reference[feats])
    return None
