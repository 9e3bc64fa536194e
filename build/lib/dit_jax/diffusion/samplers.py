"""Forward process, model posterior, and DDPM / DDIM samplers (pure, jit-friendly).

``t`` is always an int32 ``[N]`` array of chain indices; the model is called as
``model_fn(x, d.timestep_map[t])`` so it sees original timesteps. Arrays are NHWC and
a learned-sigma model returns ``2C`` channels: eps first, variance values last.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from dit_jax.diffusion.schedule import Diffusion, _extract

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def q_sample(d: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample x_t ~ q(x_t | x_0) with the given standard-normal ``noise``."""
    return (
        _extract(d.sqrt_alphas_cumprod, t, x_start) * x_start
        + _extract(d.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(
    d: Diffusion, x_start: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each x_t's shape."""
    mean = (
        _extract(d.posterior_mean_coef1, t, x_t) * x_start
        + _extract(d.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = _extract(d.posterior_variance, t, x_t)
    log_variance = _extract(d.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance


def _predict_xstart_from_eps(
    d: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    return (
        _extract(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - _extract(d.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def _predict_eps_from_xstart(
    d: Diffusion, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array
) -> jax.Array:
    return (_extract(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(
        d.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def _split_output(
    d: Diffusion, output: jax.Array, x: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Split a model output into (eps, variance values); the latter is None without learn_sigma."""
    channels = x.shape[-1]
    expected = x.shape[:-1] + ((2 * channels,) if d.learn_sigma else (channels,))
    if output.shape != expected:
        raise ValueError(
            f"model output shape {output.shape} does not match {expected} "
            f"(input {x.shape}, learn_sigma={d.learn_sigma})"
        )
    if d.learn_sigma:
        return output[..., :channels], output[..., channels:]
    return output, None


def _p_mean_variance_from_output(
    d: Diffusion,
    eps: jax.Array,
    var_values: jax.Array | None,
    x: jax.Array,
    t: jax.Array,
    *,
    clip_denoised: bool,
) -> dict[str, jax.Array]:
    """p(x_{t-1} | x_t) from an already-split model output (see ``p_mean_variance``)."""
    if d.learn_sigma:
        # var_values in [-1, 1] interpolates log-variance between posterior and beta.
        min_log = _extract(d.posterior_log_variance_clipped, t, x)
        max_log = _extract(d.log_betas, t, x)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = jnp.exp(log_variance)
    elif d.sigma_small:
        variance = _extract(d.posterior_variance, t, x)
        log_variance = _extract(d.posterior_log_variance_clipped, t, x)
    else:
        # Fixed large: beta_t, with the t = 0 entry set to the posterior variance at t = 1.
        large = jnp.concatenate([d.posterior_variance[1:2], d.betas[1:]])
        large_log = jnp.concatenate([d.posterior_log_variance_clipped[:1], d.log_betas[1:]])
        variance = _extract(large, t, x)
        log_variance = _extract(large_log, t, x)
    pred_xstart = _predict_xstart_from_eps(d, x, t, eps)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = q_posterior_mean_variance(d, pred_xstart, x, t)
    return {
        "mean": mean,
        "variance": variance,
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
    }


def p_mean_variance(
    d: Diffusion, model_fn: ModelFn, x: jax.Array, t: jax.Array, *, clip_denoised: bool = False
) -> dict[str, jax.Array]:
    """Model p(x_{t-1} | x_t) as a dict: mean, variance, log_variance, pred_xstart."""
    eps, var_values = _split_output(d, model_fn(x, d.timestep_map[t]), x)
    return _p_mean_variance_from_output(d, eps, var_values, x, t, clip_denoised=clip_denoised)


def _nonzero_mask(t: jax.Array, x: jax.Array) -> jax.Array:
    """1 where t != 0, else 0, shaped to broadcast against x (no noise on the last step)."""
    return (t != 0).astype(x.dtype).reshape(t.shape + (1,) * (x.ndim - t.ndim))


def p_sample(
    d: Diffusion,
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    clip_denoised: bool = False,
) -> dict[str, jax.Array]:
    """One ancestral (DDPM) step x_t -> x_{t-1}: dict of ``sample`` and ``pred_xstart``."""
    out = p_mean_variance(d, model_fn, x, t, clip_denoised=clip_denoised)
    sample = out["mean"] + _nonzero_mask(t, x) * jnp.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_sample(
    d: Diffusion,
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    *,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> dict[str, jax.Array]:
    """One DDIM step (Song et al. eq. 12; eta = 0 is deterministic): ``sample``, ``pred_xstart``."""
    out = p_mean_variance(d, model_fn, x, t, clip_denoised=clip_denoised)
    # Re-derive eps from the (possibly clipped) x_0 prediction, as the official code does.
    eps = _predict_eps_from_xstart(d, x, t, out["pred_xstart"])
    alpha_bar = _extract(d.alphas_cumprod, t, x)
    alpha_bar_prev = _extract(d.alphas_cumprod_prev, t, x)
    sigma = (
        eta
        * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    )
    mean_pred = (
        out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
        + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    )
    sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def per_sample_keys(key: jax.Array) -> bool:
    """Whether ``key`` is a batch of keys (typed ``[N]`` or raw ``[N, 2]``) rather than one key."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def _reverse_chain(
    d: Diffusion,
    step: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    noise: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """Run ``step(x, t, step_noise)`` for t = T-1 .. 0 as one ``lax.scan``.

    ``key`` is one key (the noise of chain index i for the whole batch is drawn from
    ``fold_in(key, i)``) or one key per sample (sample j's from ``fold_in(key[j], i)``, so a
    sample does not depend on the batch it is drawn in: see ``per_sample_keys``).
    """
    batch = noise.shape[0]
    per_sample = per_sample_keys(key)
    if per_sample and key.shape[0] != batch:
        raise ValueError(f"{key.shape[0]} per-sample keys for a batch of {batch}")

    def draw(k: jax.Array, i: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(k, i), shape, noise.dtype)

    def body(x: jax.Array, i: jax.Array) -> tuple[jax.Array, None]:
        t = jnp.full((batch,), i, dtype=jnp.int32)
        if per_sample:
            step_noise = jax.vmap(lambda k: draw(k, i, x.shape[1:]))(key)
        else:
            step_noise = draw(key, i, x.shape)
        return step(x, t, step_noise).astype(x.dtype), None

    indices = jnp.arange(d.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    x, _ = jax.lax.scan(body, noise, indices)
    return x


def p_sample_loop(
    d: Diffusion,
    model_fn: ModelFn,
    noise: jax.Array,
    key: jax.Array,
    *,
    clip_denoised: bool = False,
) -> jax.Array:
    """Ancestral sampling over the whole chain, starting from x_T = ``noise``; ``key``: one or one per sample."""

    def step(x: jax.Array, t: jax.Array, step_noise: jax.Array) -> jax.Array:
        return p_sample(d, model_fn, x, t, step_noise, clip_denoised=clip_denoised)["sample"]

    return _reverse_chain(d, step, noise, key)


def ddim_sample_loop(
    d: Diffusion,
    model_fn: ModelFn,
    noise: jax.Array,
    key: jax.Array,
    *,
    eta: float = 0.0,
    clip_denoised: bool = False,
) -> jax.Array:
    """DDIM sampling over the whole chain, starting from x_T = ``noise``; ``key``: one or one per sample."""

    def step(x: jax.Array, t: jax.Array, step_noise: jax.Array) -> jax.Array:
        return ddim_sample(d, model_fn, x, t, step_noise, eta=eta, clip_denoised=clip_denoised)[
            "sample"
        ]

    return _reverse_chain(d, step, noise, key)
