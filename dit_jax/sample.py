"""Sampling: class-conditional images from a DiT, with classifier-free guidance.

``generate`` is one jitted program per (shape, sampler): the whole reverse chain is a
``lax.scan`` inside the diffusion samplers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax import diffusion as gd
from dit_jax.models import DiT, check_labels

SAMPLERS = ("ddpm", "ddim")


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "eta"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, diffusion: gd.Diffusion, labels: jax.Array,
              key: jax.Array, cfg_scale: jax.Array, *, sampler: str, eta: float) -> jax.Array:
    model = nnx.merge(graphdef, state)
    n = labels.shape[0]
    noise_key, loop_key = jax.random.split(key)
    shape = (n, model.input_size, model.input_size, model.in_channels)
    noise = jax.random.normal(noise_key, shape)
    # Guided: conditional half then null half on the same noise; keep the conditional half.
    z = jnp.concatenate([noise, noise])
    y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])

    def model_fn(x, t):
        return model.forward_with_cfg(x, t, y, cfg_scale)

    if sampler == "ddpm":
        out = gd.p_sample_loop(diffusion, model_fn, z, loop_key)
    else:
        out = gd.ddim_sample_loop(diffusion, model_fn, z, loop_key, eta=eta)
    return out[:n]


def generate(model: DiT, diffusion: gd.Diffusion, labels: jax.Array, key: jax.Array, *,
             cfg_scale: float = 4.0, sampler: str = "ddpm", eta: float = 0.0) -> jax.Array:
    """Samples [N, H, W, C] for ``labels`` [N] (int, < num_classes) with guidance ``cfg_scale``.

    ``diffusion`` sets the chain (e.g. ``create_diffusion("250")`` for the paper's 250 DDPM
    steps); guidance needs a model trained with label dropout (it has a null label).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if model.y_embedder.dropout_prob <= 0:
        raise ValueError("classifier-free guidance needs a null label: this model was built with class_dropout_prob=0")
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    check_labels(labels, model.num_classes, allow_null=False)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, diffusion, labels, key, jnp.float32(cfg_scale), sampler=sampler, eta=eta)
