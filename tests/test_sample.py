"""Guided sampling: shapes, determinism, agreement with the diffusion loops, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import diffusion as gd, sample
from dit_jax.models import DiT

TINY = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def model():
    m = DiT(**TINY, rngs=nnx.Rngs(0))
    # Non-zero output layers so the samples depend on labels and guidance.
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(m, nnx.Param))):
        var[...] = 0.05 * jax.random.normal(jax.random.key(i), var[...].shape)
    return m


def test_samples_have_the_model_shape_and_are_deterministic(model):
    chain = gd.create_diffusion("5")
    labels = jnp.array([0, 1, 4])
    a = sample.generate(model, chain, labels, jax.random.key(0), cfg_scale=2.0)
    b = sample.generate(model, chain, labels, jax.random.key(0), cfg_scale=2.0)
    c = sample.generate(model, chain, labels, jax.random.key(1), cfg_scale=2.0)
    assert a.shape == (3, 8, 8, 3) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_generate_is_the_guided_ddim_loop(model):
    chain = gd.create_diffusion("ddim5")
    labels = jnp.array([2, 3])
    key = jax.random.key(7)
    ours = sample.generate(model, chain, labels, key, cfg_scale=3.0, sampler="ddim")
    noise = jax.random.normal(jax.random.split(key)[0], (2, 8, 8, 3))
    y = jnp.concatenate([labels, jnp.full_like(labels, TINY["num_classes"])])
    loop = gd.ddim_sample_loop(chain, lambda x, t: model.forward_with_cfg(x, t, y, 3.0),
                               jnp.concatenate([noise, noise]), jax.random.split(key)[1])
    np.testing.assert_allclose(ours, loop[:2], rtol=1e-5, atol=1e-5)


def test_guidance_scale_changes_samples(model):
    chain = gd.create_diffusion("ddim5")
    labels = jnp.array([0, 1])
    one = sample.generate(model, chain, labels, jax.random.key(0), cfg_scale=1.0, sampler="ddim")
    four = sample.generate(model, chain, labels, jax.random.key(0), cfg_scale=4.0, sampler="ddim")
    assert not np.allclose(one, four)


@pytest.mark.parametrize("labels, kwargs, message", [
    (jnp.array([0, 5]), {}, r"class labels must be in \[0, 4\]"),
    (jnp.array([-1]), {}, "class labels must be in"),
    (jnp.array([0.5]), {}, "labels must be integers"),
    (jnp.array([0]), {"sampler": "euler"}, "sampler 'euler'"),
])
def test_bad_requests_are_named(model, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample.generate(model, gd.create_diffusion("5"), labels, jax.random.key(0), **kwargs)


def test_guidance_needs_a_null_label():
    m = DiT(**TINY, class_dropout_prob=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="class_dropout_prob=0"):
        sample.generate(m, gd.create_diffusion("5"), jnp.array([0]), jax.random.key(0))
