"""How the DiT's numbers are computed, never what: the compute options and the kernels they choose.

The config's ``dtype``, ``remat``, ``attention`` and the compute switches ``qkv``, ``gelu_backward``
and ``norm_modulate`` (``docs/compute_switches.md``) change neither the parameters nor the maths;
``compute_options`` checks them and turns them into ``models.DiT`` keyword arguments. Here too are
what they select: the attention kernel (``"auto"`` resolved by ``resolve_attention``), a linear
layer's matmuls over the slices of a fused kernel (``projections``, for ``qkv="split"``), the MLP's
bias + GELU with a recomputing backward (``bias_gelu``) and adaLN's LayerNorm + modulation with a
one-pass backward (``norm_modulate``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from jax import lax

# Compute dtypes by config name; parameters, optimiser state and losses stay float32.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Rematerialisation of each transformer block in the backward pass: "none" keeps every
# activation, "block" recomputes the whole block (saves only its input), "dots" keeps the
# outputs of the block's linear layers (matmuls without batch dimensions) and recomputes
# the rest: attention, norms, modulation, GELU.
REMAT_MODES = ("none", "block", "dots")
REMAT_POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
# jax.nn.dot_product_attention implementations: "xla" (any backend), "cudnn" (fused flash
# attention on NVIDIA GPUs; 16-bit inputs, head_dim a multiple of 8 and at most 128), or "auto"
# (cuDNN where it works, XLA elsewhere: ``resolve_attention``).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# Compute switches for the passes around the matmuls; none changes the parameters or the maths
# (the first of each is the plain path). qkv "split": q, k and v (cross-attention's k and v) by
# separate matmuls over slices of the fused kernel (``projections``), so they and their gradients
# are whole arrays, not slices of one [.., 3, ..] tensor. gelu_backward "recompute": the MLP's
# bias + GELU saves only the fc1 matmul's output and recomputes the GELU in its backward
# (``bias_gelu``). norm_modulate "fused": adaLN's LayerNorm + modulation as one function with a
# one-pass backward (``norm_modulate``).
QKV_MODES = ("fused", "split")
GELU_BACKWARD_MODES = ("saved", "recompute")
NORM_MODULATE_MODES = ("xla", "fused")
# The config fields of the switches and their values (the default first).
SWITCH_FIELDS = {"qkv": QKV_MODES, "gelu_backward": GELU_BACKWARD_MODES, "norm_modulate": NORM_MODULATE_MODES}


def cudnn_head_dim_ok(head_dim: int) -> bool:
    """Whether cuDNN's fused attention takes heads of this size (a multiple of 8, at most 128)."""
    return head_dim % 8 == 0 and head_dim <= 128


@functools.cache
def _cudnn_probe_error(head_dim: int) -> str | None:
    """None if cuDNN's fused attention compiles here (forward and backward, a small bfloat16 shape),
    else the first line of its error (an old cuDNN or CUDA, a missing plugin, ...)."""
    shape = jax.ShapeDtypeStruct((1, 64, 2, head_dim), jnp.bfloat16)

    def loss(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32).sum()

    try:
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    except Exception as e:  # any refusal means: use XLA's attention
        return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return None


def resolve_attention(dtype: Any, head_dim: int) -> tuple[str, str]:
    """``attention="auto"``: (the implementation to use, why): cuDNN's fused attention on an NVIDIA
    GPU when the compute dtype is bfloat16, the head size suits it and a tiny compile probe passes;
    XLA's attention otherwise."""
    backend = jax.default_backend()
    if backend != "gpu":
        return "xla", f"JAX runs on {backend!r}"
    if jnp.dtype(dtype) != jnp.bfloat16:
        return "xla", f"the compute dtype is {jnp.dtype(dtype).name} (cuDNN's fused attention needs bfloat16)"
    if not cudnn_head_dim_ok(head_dim):
        return "xla", f"the head size {head_dim} is not a multiple of 8 at most 128 (cuDNN's fused attention)"
    error = _cudnn_probe_error(head_dim)
    if error is not None:
        return "xla", f"cuDNN's fused attention failed to compile here: {error}"
    return "cudnn", "NVIDIA GPU, bfloat16, head size " + str(head_dim)


@functools.cache
def auto_attention(dtype_name: str, head_dim: int) -> str:
    """``resolve_attention`` once per process and setting, with one log line where a GPU falls back to XLA."""
    implementation, reason = resolve_attention(dtype_name, head_dim)
    if implementation == "xla" and jax.default_backend() == "gpu":
        logging.warning("attention 'auto' uses XLA's attention, not cuDNN's: %s", reason)
    return implementation


def _mode_problems(remat: Any, attention: Any, qkv: Any, gelu_backward: Any, norm_modulate: Any) -> list[str]:
    values = dict(remat=remat, attention=attention, qkv=qkv, gelu_backward=gelu_backward, norm_modulate=norm_modulate)
    choices = {"remat": REMAT_MODES, "attention": ATTENTION_IMPLEMENTATIONS, **SWITCH_FIELDS}
    return [f"{name} {values[name]!r} is not one of {modes}" for name, modes in choices.items()
            if values[name] not in modes]


def model_problems(*, remat: Any, attention: Any, head_dim: int, qkv: Any, gelu_backward: Any,
                   norm_modulate: Any) -> list[str]:
    """What is wrong with a ``DiT``'s compute arguments (its heads of ``head_dim``), one line each."""
    problems = _mode_problems(remat, attention, qkv, gelu_backward, norm_modulate)
    if attention == "cudnn" and not cudnn_head_dim_ok(head_dim):
        problems.append(f"attention 'cudnn' needs a head size (hidden_size / num_heads) that is a multiple of 8 "
                        f"and at most 128, got {head_dim}; use attention 'xla'")
    return problems


def compute_options(dtype: str, remat: str, attention: str, *, qkv: str = "fused", gelu_backward: str = "saved",
                    norm_modulate: str = "xla") -> dict[str, Any]:
    """``DiT`` keyword arguments from the config's ``dtype``, ``remat``, ``attention``, ``qkv``,
    ``gelu_backward`` and ``norm_modulate`` names.

    ``attention="cudnn"`` is refused unless this process runs on a GPU in bfloat16: cuDNN's
    fused kernels exist only there (and only for 16-bit inputs). ``"auto"`` passes through: the
    ``DiT`` resolves it (``resolve_attention``), knowing its head size.
    """
    problems = [] if dtype in DTYPES else [f"dtype {dtype!r} is not one of {tuple(DTYPES)}"]
    problems += _mode_problems(remat, attention, qkv, gelu_backward, norm_modulate)
    if attention == "cudnn":
        if dtype != "bfloat16":
            problems.append(f"attention 'cudnn' needs dtype 'bfloat16' (cuDNN's fused attention is 16-bit), "
                            f"got {dtype!r}; use attention 'xla' for float32")
        if jax.default_backend() != "gpu":
            problems.append(f"attention 'cudnn' needs an NVIDIA GPU, but JAX runs on {jax.default_backend()!r}; "
                            f"use attention 'xla'")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    return dict(dtype=DTYPES[dtype], remat=remat, attention=attention, qkv=qkv, gelu_backward=gelu_backward,
                norm_modulate=norm_modulate)


def projections(layer: nnx.Linear | nnx.LinearGeneral, x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """A linear layer's (x @ kernel, bias) in its compute dtype, one pair per projection of a
    ``[din, n, dout]`` kernel (``n`` separate matmuls over its slices), one for a ``[din, dout]`` kernel."""
    x, kernel, bias = layer.promote_dtype((x, layer.kernel[...], layer.bias[...]), dtype=layer.dtype)
    kernels, biases = ([kernel[:, i] for i in range(kernel.shape[1])], list(bias)) if kernel.ndim == 3 else ([kernel], [bias])
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return tuple((lax.dot_general(x, k, dims, precision=layer.precision), b) for k, b in zip(kernels, biases))


def tanh_gelu(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (the official MLP's)."""
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def bias_gelu(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``gelu(y + bias)`` (tanh approximation) whose backward recomputes the GELU from ``y`` (a matmul's
    output, written anyway) instead of saving its intermediates: dy and the bias gradient in one pass."""
    return tanh_gelu(y + bias)


def _bias_gelu_fwd(y: jax.Array, bias: jax.Array):
    return bias_gelu(y, bias), (y, bias)


def _bias_gelu_bwd(residuals, g: jax.Array):
    y, bias = residuals
    (dy,) = jax.vjp(tanh_gelu, y + bias)[1](g)
    return dy, dy.sum(tuple(range(dy.ndim - bias.ndim))).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def _norm_modulate_fwd(x: jax.Array, shift: jax.Array, scale: jax.Array, epsilon: float):
    # nnx.LayerNorm's values: statistics in (at least) float32, E[x^2] - E[x]^2 clipped at 0, the
    # normalised tokens cast back to x's dtype; then the modulation ``models.modulate`` in that dtype.
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)
    var = jnp.maximum(0.0, lax.square(xf).mean(-1, keepdims=True) - lax.square(mean))
    rstd = lax.rsqrt(var + epsilon)
    normed = ((xf - mean) * rstd).astype(x.dtype)
    return normed * (1 + scale[:, None]) + shift[:, None], (x, mean, rstd, scale)


def _norm_modulate_bwd(epsilon: float, residuals, g: jax.Array):
    x, mean, rstd, scale = residuals
    xhat = (x.astype(mean.dtype) - mean) * rstd
    g = g.astype(mean.dtype)
    dshift, dscale = g.sum(1), (g * xhat).sum(1)
    g = g * (1 + scale).astype(mean.dtype)[:, None]
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx.astype(x.dtype), dshift.astype(scale.dtype), dscale.astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def norm_modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
    """``modulate(LayerNorm(x), shift, scale)`` (no affine LayerNorm over the last axis of [N, T, D]),
    the same values, with a backward that reads x once: it saves only x and per-token statistics,
    and dx is one pass over rows (the means of g' and g' * xhat, g' = g * (1 + scale))."""
    return _norm_modulate_fwd(x, shift, scale, epsilon)[0]


norm_modulate.defvjp(_norm_modulate_fwd, _norm_modulate_bwd)
