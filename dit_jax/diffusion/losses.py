"""Training objective: epsilon MSE plus the variational-bound term for a learned variance."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dit_jax.diffusion.samplers import (
    ModelFn,
    _p_mean_variance_from_output,
    _split_output,
    q_posterior_mean_variance,
    q_sample,
)
from dit_jax.diffusion.schedule import Diffusion

_LOG2 = math.log(2.0)
_BIN_HALF_WIDTH = 1.0 / 255.0  # data assumed to be uint8 rescaled to [-1, 1]
_EDGE = 0.999
_LOG_FLOOR = 1e-12


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all axes but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (broadcasting)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by ADM/DiT."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """Log-probability (nats) of 8-bit bins of width 2/255 around ``x`` in [-1, 1].

    The outermost bins extend to +-infinity (for x beyond +-0.999).
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shape mismatch: x {x.shape}, means {means.shape}, log_scales {log_scales.shape}"
        )
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + _BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - _BIN_HALF_WIDTH))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, _LOG_FLOOR))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, _LOG_FLOOR))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, _LOG_FLOOR))
    return jnp.where(
        x < -_EDGE,
        log_cdf_plus,
        jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta),
    )


def _vb_terms_bpd(
    d: Diffusion,
    eps: jax.Array,
    var_values: jax.Array,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
) -> jax.Array:
    """Per-sample VLB term in bits/dim: decoder NLL at t == 0, else KL(q posterior || p)."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(d, x_start, x_t, t)
    out = _p_mean_variance_from_output(d, eps, var_values, x_t, t, clip_denoised=False)
    kl = (
        mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / _LOG2
    )
    decoder_nll = (
        -mean_flat(
            discretized_gaussian_log_likelihood(
                x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
            )
        )
        / _LOG2
    )
    return jnp.where(t == 0, decoder_nll, kl)


def training_losses(
    d: Diffusion, model_fn: ModelFn, x_start: jax.Array, t: jax.Array, noise: jax.Array
) -> dict[str, jax.Array]:
    """Per-sample losses ``loss``, ``mse`` and (with learn_sigma) ``vb``, each ``[N]``.

    ``vb`` sees the eps prediction through ``stop_gradient``, so it only trains the
    variance channels (the official "hybrid" objective). It is scaled by
    ``num_timesteps / 1000`` only when ``d.rescale_learned_sigmas`` (RESCALED_MSE).
    """
    x_t = q_sample(d, x_start, t, noise)
    eps, var_values = _split_output(d, model_fn(x_t, d.timestep_map[t]), x_t)
    terms = {"mse": mean_flat((noise - eps) ** 2)}
    if d.learn_sigma:
        vb = _vb_terms_bpd(d, jax.lax.stop_gradient(eps), var_values, x_start, x_t, t)
        if d.rescale_learned_sigmas:
            vb = vb * (d.num_timesteps / 1000.0)
        terms["vb"] = vb
        terms["loss"] = terms["mse"] + vb
    else:
        terms["loss"] = terms["mse"]
    return terms
