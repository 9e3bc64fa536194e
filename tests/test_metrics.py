"""The metric stage against an independent NumPy oracle written from shared/specs/evaluator.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dit_jax.fid import metrics


# ------------------------------------------------------------------ the oracle (from the spec, not the code)

def oracle_fd(mu1, s1, mu2, s2):
    """tr sqrtm(S1 S2) = tr sqrtm(S1^1/2 S2 S1^1/2): symmetric eigendecompositions only, float64."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def oracle_is(logits, split=5000):
    scores = []
    for start in range(0, len(logits), split):
        part = np.asarray(logits[start:start + split], np.float64)
        p = np.exp(part - part.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        marginal = p.mean(0)
        kls = [np.sum(pi * (np.log(pi) - np.log(marginal))) for pi in p]
        scores.append(np.exp(np.mean(kls)))
    return float(np.mean(scores))


def _float32_sum(values) -> np.float32:
    """A float32 accumulation modelled as correctly rounded: the exact sum, rounded once to float32."""
    return np.float32(math.fsum(float(x) for x in values))


def adm_float16_distances(u, v):
    """ADM's ``_batch_pairwise_distances`` on float16 inputs as TensorFlow runs it on a GPU, in NumPy float16.

    ``tf.cast`` to float16; ``tf.square`` rounds every square to float16; ``reduce_sum`` accumulates in
    float32 and returns float16; the matmul multiplies float16 values (exact in float32) and accumulates in
    float32 (cuBLAS), returning float16; then ``norm_u - 2 * dot + norm_v`` in float16 operations (``2 * dot``
    is inf past 65504) and ``tf.maximum(., 0)`` (-inf gives 0, NaN stays NaN). None when a value is then not
    finite (ADM then uses float32).
    """
    u16, v16 = np.asarray(u).astype(np.float16), np.asarray(v).astype(np.float16)
    nu = np.array([_float32_sum(row) for row in u16 * u16]).astype(np.float16)
    nv = np.array([_float32_sum(row) for row in v16 * v16]).astype(np.float16)
    dot = np.array([[_float32_sum(a.astype(np.float64) * b.astype(np.float64)) for b in v16] for a in u16])
    dot = dot.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        d = (nu[:, None] - np.float16(2) * dot) + nv[None, :]
        d = np.maximum(d, np.float16(0))
    return d.astype(np.float32) if np.isfinite(d).all() else None


def oracle_distances(u, v, mode):
    """Squared distances max(|u|^2 - 2 u.v + |v|^2, 0), rows u, columns v: float16 as ADM's GPU graph
    (``adm_float16_distances``), the whole block in float32 if any value is not finite; float32: plain float32."""
    if mode == "float16":
        d = adm_float16_distances(u, v)
        if d is not None:
            return d
    u32, v32 = np.asarray(u, np.float32), np.asarray(v, np.float32)
    d = (u32 ** 2).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 ** 2).sum(1)[None, :]
    return np.maximum(d, 0)


def oracle_pr(ref, samples, mode, k=3):
    def radii(x):
        return np.sort(oracle_distances(x, x, mode), axis=1)[:, k]  # (k+1)-th smallest, itself included
    r_ref, r_s = radii(ref), radii(samples)
    d = oracle_distances(ref, samples, mode)  # reference rows, sample columns
    precision = np.mean([(d[:, j] <= r_ref).any() for j in range(len(samples))])
    recall = np.mean([(d[i, :] <= r_s).any() for i in range(len(ref))])
    return float(precision), float(recall)


# ------------------------------------------------------------------ Fréchet distance

def _random_stats(rng, n, d, shift=0.0, scale=1.0):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale + shift
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_the_oracle():
    rng = np.random.default_rng(0)
    for d in (8, 64):
        mu1, s1 = _random_stats(rng, 400, d)
        mu2, s2 = _random_stats(rng, 300, d, shift=0.3, scale=1.2)
        ours, ref = metrics.frechet_distance(mu1, s1, mu2, s2), oracle_fd(mu1, s1, mu2, s2)
        assert ref > 1.0
        assert abs(ours - ref) <= 1e-6 * max(1.0, abs(ref))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    mu, sigma = _random_stats(rng, 500, 16)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    # Diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.5, 3, 10), rng.uniform(0.5, 3, 10)
    m1, m2 = rng.normal(size=10), rng.normal(size=10)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # A scaled copy: S2 = c^2 S1 -> |dmu|^2 + (1 - c)^2 tr S1.
    c = 1.7
    expected = np.sum((mu - 1) ** 2) + (1 - c) ** 2 * np.trace(sigma)
    assert metrics.frechet_distance(mu, sigma, np.ones_like(mu), c * c * sigma) == pytest.approx(expected, rel=1e-9)
    # Unit-variance 1-D Gaussians 2 apart: 4.
    assert metrics.frechet_distance(np.array([0.0]), np.eye(1), np.array([2.0]), np.eye(1)) == pytest.approx(4.0)


def test_frechet_distance_bad_statistics():
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    # Not a covariance (negative eigenvalues): the square root has a large imaginary diagonal.
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -4.0]), np.zeros(2), np.eye(2))


def test_statistics_are_float64_numpy_cov():
    x = np.random.default_rng(2).normal(size=(50, 5)).astype(np.float32)
    mu, sigma = metrics.statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.statistics(x[:1])


# ------------------------------------------------------------------ Inception Score

def test_inception_score_matches_the_oracle_with_contiguous_splits():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(11000, 20))
    logits[:5000] *= 2  # splits differ, so the split boundaries matter
    ours = metrics.inception_score(logits)
    assert ours == pytest.approx(oracle_is(logits), rel=1e-5)
    assert ours != pytest.approx(oracle_is(rng.permutation(logits), 5000), rel=1e-5)  # order matters (no shuffle)
    small = rng.normal(size=(23, 7))
    assert metrics.inception_score(small, split_size=5) == pytest.approx(oracle_is(small, 5), rel=1e-5)


def test_inception_score_closed_forms():
    # Confident and evenly spread over C classes: C; identical predictions: 1.
    confident = np.full((40, 8), -50.0)
    confident[np.arange(40), np.arange(40) % 8] = 50.0
    assert metrics.inception_score(confident) == pytest.approx(8.0, rel=1e-6)
    assert metrics.inception_score(np.tile(np.random.default_rng(4).normal(size=8), (30, 1))) == pytest.approx(1.0)


def test_inception_score_counts_probabilities_that_underflow_to_zero_as_nothing():
    # Class 0 is never predicted: its softmax probability is exactly 0.0 in float64 for every image
    # (exp(-2000)), so its mean is 0 too; p log(p / mean p) -> 0 there, not 0 * inf = NaN.
    confident = np.full((42, 8), -50.0)
    confident[np.arange(42), 1 + np.arange(42) % 7] = 50.0  # evenly over the other 7 classes: IS 7
    confident[:, 0] = -2000.0
    assert metrics.inception_score(confident) == pytest.approx(7.0, rel=1e-6)


# ------------------------------------------------------------------ precision / recall

def _clusters(rng, n, d, centres, spread):
    """Points around a few centres, some repeated exactly (ties at the radius)."""
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=spread, size=(n, d))
    dup = np.arange(0, n - 1, 17)
    x[dup] = x[dup + 1]
    return np.abs(x).astype(np.float32)  # non-negative, like pool_3 features


@pytest.mark.parametrize("mode", ["float16", "float32"])
def test_precision_recall_exactly_match_the_oracle(mode):
    rng = np.random.default_rng(5)
    d = 48
    centres = rng.normal(scale=1.0, size=(6, d))
    ref = _clusters(rng, 90, d, centres, 0.5)
    samples = _clusters(rng, 70, d, centres[:4] + 0.2, 0.6)
    expected = oracle_pr(ref, samples, mode)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    # Blocks of 32 rows/columns (not a divisor of either set) must not change anything.
    for block in (32, 10000):
        assert metrics.precision_recall(ref, samples, float16=mode == "float16", block=block) == expected


def test_distance_blocks_are_float16_and_fall_back_to_float32():
    rng = np.random.default_rng(6)
    u, v = rng.uniform(0, 2, (20, 32)).astype(np.float32), rng.uniform(0, 2, (15, 32)).astype(np.float32)
    d16 = metrics.pairwise_distances(u, v)
    np.testing.assert_array_equal(d16, d16.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(d16, oracle_distances(u, v, "float16"))
    d32 = metrics.pairwise_distances(u, v, float16=False)
    assert not np.array_equal(d16, d32)
    np.testing.assert_allclose(d32, oracle_distances(u, v, "float32"), rtol=1e-5, atol=1e-4)
    big = u * 100  # squared norms beyond float16's 65504: the whole block again in float32
    np.testing.assert_allclose(metrics.pairwise_distances(big, big), oracle_distances(big, big, "float32"),
                               rtol=1e-5, atol=1)
    assert np.isfinite(metrics.pairwise_distances(big, big)).all()


def test_float16_distances_round_as_adms_gpu_graph_not_once_from_exact_sums():
    rng = np.random.default_rng(8)
    u, v = rng.uniform(0, 3, (24, 64)).astype(np.float32), rng.uniform(0, 3, (18, 64)).astype(np.float32)
    u[:4, :8] = rng.uniform(0, 6e-5, (4, 8))  # float16 subnormals (and their squares underflow)
    u16 = u.astype(np.float16)
    squares_rounded = np.array([_float32_sum(row) for row in u16 * u16]).astype(np.float16)
    exact_once = (u16.astype(np.float64) ** 2).sum(1).astype(np.float16)
    assert (squares_rounded != exact_once).any()  # the data tells the two roundings apart
    np.testing.assert_array_equal(metrics.pairwise_distances(u, v), adm_float16_distances(u, v))
    # Norms below 65504 whose 2 * dot overflows float16: -inf, which tf.maximum turns into 0 (still float16).
    big = np.full((6, 16), 50.0, np.float32) + rng.uniform(0, 1, (6, 16)).astype(np.float32)
    np.testing.assert_array_equal(adm_float16_distances(big, big), np.zeros((6, 6)))
    np.testing.assert_array_equal(metrics.pairwise_distances(big, big), np.zeros((6, 6)))
    # Two norms summing past 65504: +inf, so the whole block again in float32.
    apart = np.zeros((2, 16), np.float32)
    apart[0, 0], apart[1, 1] = 200.0, 201.0
    assert adm_float16_distances(apart, apart) is None
    np.testing.assert_allclose(metrics.pairwise_distances(apart, apart), [[0, 80401], [80401, 0]], rtol=1e-6)


def test_precision_recall_of_identical_and_disjoint_sets():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (40, 16)).astype(np.float32)
    assert metrics.precision_recall(x, x) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100.0, float16=False) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than k = 3"):
        metrics.precision_recall(x[:3], x)
