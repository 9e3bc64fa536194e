"""Gaussian diffusion core (functional port of the official DiT / ADM ``diffusion/``)."""

from dit_jax.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    training_losses,
)
from dit_jax.diffusion.samplers import (
    ModelFn,
    ddim_sample,
    ddim_sample_loop,
    p_mean_variance,
    p_sample,
    p_sample_loop,
    per_sample_keys,
    q_posterior_mean_variance,
    q_sample,
)
from dit_jax.diffusion.schedule import (
    Diffusion,
    chain_tables,
    create_diffusion,
    get_beta_schedule,
    respaced_betas,
    space_timesteps,
)

__all__ = [
    "Diffusion",
    "ModelFn",
    "approx_standard_normal_cdf",
    "chain_tables",
    "create_diffusion",
    "ddim_sample",
    "ddim_sample_loop",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "mean_flat",
    "normal_kl",
    "p_mean_variance",
    "p_sample",
    "p_sample_loop",
    "per_sample_keys",
    "q_posterior_mean_variance",
    "q_sample",
    "respaced_betas",
    "space_timesteps",
    "training_losses",
]
