"""Noise schedules, timestep respacing and the diffusion-schedule pytree.

Mirrors the official DiT / ADM ``GaussianDiffusion`` + ``SpacedDiffusion`` set-up:
every per-timestep quantity is computed once in float64 NumPy and stored as a
float32 JAX array, which is bit-for-bit what the official code feeds its maths
(it indexes float64 tables, then casts to float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_COSINE_MAX_BETA = 0.999
_COSINE_OFFSET = 0.008


def _linear_betas(num_steps: int) -> np.ndarray:
    # Ho et al.'s 1e-4..0.02 over 1000 steps, rescaled so other lengths keep the same shape.
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def _cosine_alpha_bar(s: np.ndarray) -> np.ndarray:
    return np.cos((s + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * np.pi / 2) ** 2


def _cosine_betas(num_steps: int) -> np.ndarray:
    # Nichol & Dhariwal's alpha_bar(s) = cos^2(...), discretised and capped to avoid beta = 1.
    steps = np.arange(num_steps, dtype=np.float64)
    ratio = _cosine_alpha_bar((steps + 1) / num_steps) / _cosine_alpha_bar(steps / num_steps)
    return np.minimum(1 - ratio, _COSINE_MAX_BETA)


_SCHEDULES = {
    "linear": _linear_betas,
    "cosine": _cosine_betas,
    "squaredcos_cap_v2": _cosine_betas,
}


def get_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Float64 betas of a named schedule ("linear" or "cosine", alias "squaredcos_cap_v2")."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid options are {sorted(_SCHEDULES)}")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return _SCHEDULES[name](int(num_steps))


def _ddim_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    # DDIM paper striding: the smallest integer stride giving exactly the requested count.
    digits = section_counts[len("ddim") :]
    if not digits.isdigit() or int(digits) < 1:
        raise ValueError(
            f"bad timestep respacing {section_counts!r}: 'ddimN' needs a positive integer N"
        )
    desired = int(digits)
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            return list(range(0, num_timesteps, stride))
    raise ValueError(
        f"bad timestep respacing {section_counts!r}: no integer stride gives exactly "
        f"{desired} of {num_timesteps} steps"
    )


def _parse_section_counts(section_counts: str) -> list[int]:
    try:
        counts = [int(part) for part in section_counts.split(",")]
    except ValueError:
        raise ValueError(
            f"bad timestep respacing {section_counts!r}: expected '' (no respacing), "
            "'ddimN', or comma-separated positive integers such as '250' or '25,10,5'"
        ) from None
    if any(c < 1 for c in counts):
        raise ValueError(
            f"bad timestep respacing {section_counts!r}: section counts must be positive"
        )
    return counts


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """Sorted original timesteps kept by a respacing string, as in the official respacer.

    ``""`` keeps every step; ``"ddimN"`` uses the DDIM fixed stride; ``"a,b,c"`` splits
    the chain into equal sections (earlier sections get the remainder) and takes
    evenly spaced steps (Python ``round``, as officially) from each.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if section_counts == "":
        return list(range(num_timesteps))
    if section_counts.startswith("ddim"):
        return _ddim_timesteps(num_timesteps, section_counts)
    counts = _parse_section_counts(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(
                f"bad timestep respacing {section_counts!r}: section {i} has {size} of "
                f"{num_timesteps} steps and cannot hold {count}"
            )
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Accumulate (not multiply) so rounding matches the official float sequence.
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


@struct.dataclass
class Diffusion:
    """Per-timestep tables of a (possibly respaced) Gaussian diffusion chain.

    Arrays are float32 ``[T]`` indexed by chain index; ``timestep_map[i]`` is the original
    timestep the model sees for chain index ``i``. Variance type is static: learned range
    (``learn_sigma``), else fixed small (``sigma_small``), else fixed large.
    """

    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timestep_map: jax.Array
    learn_sigma: bool = struct.field(pytree_node=False, default=True)
    sigma_small: bool = struct.field(pytree_node=False, default=False)
    rescale_learned_sigmas: bool = struct.field(pytree_node=False, default=False)

    @property
    def num_timesteps(self) -> int:
        """Length of the chain (static: it is an array shape)."""
        return self.betas.shape[0]


def chain_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The per-timestep tables of the chain with these ``betas``: float64 NumPy, on the host.

    ``Diffusion`` holds them as float32 jax arrays; code that must not touch a JAX device
    (the PyTorch side of the benchmark) reads them here.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"a diffusion chain needs at least 2 steps, got {betas.shape[0]}")
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("betas must lie in (0, 1]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    return dict(
        betas=betas,
        log_betas=np.log(betas),
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1),
        posterior_variance=posterior_variance,
        # The posterior variance is 0 at t = 0, so its log borrows the t = 1 value there.
        posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )


def _diffusion_from_betas(
    betas: np.ndarray,
    timestep_map: list[int],
    *,
    learn_sigma: bool,
    sigma_small: bool,
    rescale_learned_sigmas: bool,
) -> Diffusion:
    tables = {name: jnp.asarray(value.astype(np.float32)) for name, value in chain_tables(betas).items()}
    return Diffusion(
        **tables,
        timestep_map=jnp.asarray(np.asarray(timestep_map, dtype=np.int32)),
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        rescale_learned_sigmas=rescale_learned_sigmas,
    )


def respaced_betas(timestep_respacing: str = "", *, noise_schedule: str = "linear",
                   diffusion_steps: int = 1000) -> tuple[np.ndarray, list[int]]:
    """Float64 betas of the respaced chain and the original timesteps it keeps, on the host (NumPy only).

    Respaced betas keep the original alpha_bar at the kept steps: ``beta_i = 1 - abar[t_i] / abar[t_{i-1}]``.
    """
    base = get_beta_schedule(noise_schedule, diffusion_steps)
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    kept_abar = np.cumprod(1.0 - base)[kept]
    return 1.0 - kept_abar / np.append(1.0, kept_abar[:-1]), kept


def create_diffusion(
    timestep_respacing: str = "",
    *,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> Diffusion:
    """The official DiT ``create_diffusion``: epsilon prediction, MSE loss, respaced chain.

    The chain is ``respaced_betas``'s. ``rescale_learned_sigmas`` selects the
    official RESCALED_MSE loss (vb scaled by ``num_timesteps / 1000``); DiT leaves it off.
    """
    betas, kept = respaced_betas(timestep_respacing, noise_schedule=noise_schedule, diffusion_steps=diffusion_steps)
    return _diffusion_from_betas(
        betas,
        kept,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        rescale_learned_sigmas=rescale_learned_sigmas,
    )


def _extract(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """``table[t]`` for a batch of chain indices ``t`` [N], broadcast to ``x``'s shape."""
    values = table[t].reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return jnp.broadcast_to(values, x.shape)
