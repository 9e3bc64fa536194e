"""DiT (Peebles & Xie, 2023) in Flax NNX: the model, its conditioning blocks, the 12 paper models.

Names follow the paper and the official PyTorch code (``x_embedder``, ``t_embedder``,
``y_embedder``, ``blocks``, ``adaLN_modulation``, ``final_layer``) so that official
checkpoints map onto this model name by name (see ``weights/convert.py``). Arrays are NHWC.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax import model_compute

# The four conditioning blocks of the paper's Figure 5 ablation.
BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attention", "in_context")
# Classifier-free guidance: "official" mixes only the first 3 output channels (what the
# released sampler does and what reproduces the paper's FID); "all" guides every eps channel.
GUIDANCE_MODES = ("official", "all")
OFFICIAL_GUIDANCE_CHANNELS = 3

FREQUENCY_EMBEDDING_SIZE = 256

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
normal_002 = nnx.initializers.normal(stddev=0.02)


class PosEmbed(nnx.Variable):
    """The fixed 2-D sin-cos position table: state that is saved and loaded, never trained."""


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, [N] -> [N, dim], cos first."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] table: sin of all frequencies, then cos."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """The official fixed 2-D table, [grid_size**2, dim] in row-major token order.

    The first half of the features encodes a token's column, the second half its row
    (the official code's meshgrid order), so official checkpoints' tables match exactly.
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos table, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: per-sample affine modulation of normalised tokens [N, T, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _linear(din: int, dout: int, rngs: nnx.Rngs, dtype: Any, init=xavier_uniform) -> nnx.Linear:
    return nnx.Linear(din, dout, kernel_init=init, bias_init=zeros, dtype=dtype, rngs=rngs)


def _fused_linear(din: int, n: int, dout: int, rngs: nnx.Rngs, dtype: Any) -> nnx.LinearGeneral:
    """``n`` projections of width ``dout`` in one matmul (attention's q/k/v): kernel ``[din, n, dout]``.

    Initialised and checkpointed as one ``[din, n * dout]`` linear (the official fused layer);
    the separate ``dout`` axis lets tensor parallelism split every projection into whole heads.
    """
    return nnx.LinearGeneral(din, (n, dout), kernel_init=xavier_uniform, bias_init=zeros, dtype=dtype, rngs=rngs)


def _norm(dim: int, rngs: nnx.Rngs, dtype: Any, affine: bool = False) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype, rngs=rngs)


class PatchEmbed(nnx.Module):
    """p x p patches -> tokens with a strided conv; [N, H, W, C] -> [N, (H/p)*(W/p), D]."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, dtype: Any, rngs: nnx.Rngs):
        # Official init: xavier-uniform over the conv weight viewed as [D, C*p*p].
        init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        self.proj = nnx.Conv(in_channels, hidden_size, (patch_size, patch_size), strides=patch_size,
                             padding="VALID", kernel_init=init, bias_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class TimestepEmbedder(nnx.Module):
    """Scalar timesteps -> vectors: sinusoidal features followed by a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, *, dtype: Any, rngs: nnx.Rngs):
        self.mlp = nnx.Sequential(
            _linear(FREQUENCY_EMBEDDING_SIZE, hidden_size, rngs, dtype, normal_002),
            nnx.silu,
            _linear(hidden_size, hidden_size, rngs, dtype, normal_002),
        )

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.mlp(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE))


class LabelEmbedder(nnx.Module):
    """Class labels -> vectors; one extra "null" row (index num_classes) for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, dtype: Any, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nnx.Embed(num_classes + int(dropout_prob > 0), hidden_size,
                                         embedding_init=normal_002, dtype=dtype, rngs=rngs)

    def drop_labels(self, y: jax.Array, key: jax.Array) -> jax.Array:
        """Replace each label by the null label with probability ``dropout_prob``."""
        drop = jax.random.uniform(key, y.shape) < self.dropout_prob
        return jnp.where(drop, self.num_classes, y)

    def __call__(self, y: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        if dropout_key is not None and self.dropout_prob > 0:
            y = self.drop_labels(y, dropout_key)
        return self.embedding_table(y)


class Attention(nnx.Module):
    """Multi-head attention; queries from ``x``, keys/values from ``context`` (default: ``x``)."""

    def __init__(self, dim: int, num_heads: int, *, cross: bool = False, dtype: Any, implementation: str = "xla",
                 qkv: str = "fused", rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.implementation = implementation
        self.split = qkv == "split"
        if cross:
            self.q = _fused_linear(dim, 1, dim, rngs, dtype)
            self.kv = _fused_linear(dim, 2, dim, rngs, dtype)
        else:
            self.qkv = _fused_linear(dim, 3, dim, rngs, dtype)
        self.proj = _linear(dim, dim, rngs, dtype)

    def _heads(self, layer: nnx.LinearGeneral, x: jax.Array) -> tuple[jax.Array, ...]:
        # The n projections [b, t, heads * head_dim] -> n arrays [b, t, heads, head_dim] (the official feature order).
        if self.split:
            outputs = [y + b for y, b in model_compute.projections(layer, x)]
        else:
            y = layer(x)
            outputs = [y[:, :, i] for i in range(y.shape[2])]
        b, t, d = outputs[0].shape
        return tuple(y.reshape(b, t, self.num_heads, d // self.num_heads) for y in outputs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if context is None:
            q, k, v = self._heads(self.qkv, x)
        else:
            (q,), (k, v) = self._heads(self.q, x), self._heads(self.kv, context)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return self.proj(out.reshape(x.shape[0], x.shape[1], -1))


class Mlp(nnx.Module):
    """Transformer MLP with tanh-approximated GELU (as the official code)."""

    def __init__(self, dim: int, hidden: int, *, dtype: Any, gelu_backward: str = "saved", rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden, rngs, dtype)
        self.fc2 = _linear(hidden, dim, rngs, dtype)
        self.recompute_gelu = gelu_backward == "recompute"

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.recompute_gelu:
            ((y, bias),) = model_compute.projections(self.fc1, x)
            return self.fc2(model_compute.bias_gelu(y, bias))
        return self.fc2(model_compute.tanh_gelu(self.fc1(x)))


def _adaptive_norm(norm: nnx.LayerNorm, x: jax.Array, shift: jax.Array, scale: jax.Array, fused: bool) -> jax.Array:
    """adaLN: ``modulate(norm(x), shift, scale)``, as one ``norm_modulate`` when ``fused``."""
    if fused:
        return model_compute.norm_modulate(x.astype(norm.dtype or x.dtype), shift, scale, norm.epsilon)
    return modulate(norm(x), shift, scale)


class DiTBlock(nnx.Module):
    """One transformer block with the chosen conditioning (paper Figure 3 / Figure 5).

    - ``adaln_zero``: shift/scale/gate for both branches regressed from c; the regression
      layer is zero-initialised so every block starts as the identity.
    - ``adaln``: shift/scale only, regression layer initialised like every other linear.
    - ``cross_attention``: a cross-attention layer over the [t, y] embedding tokens.
    - ``in_context``: a plain ViT block; the conditioning tokens ride in the sequence.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, block_type: str,
                 *, dtype: Any, attention: str = "xla", qkv: str = "fused", gelu_backward: str = "saved",
                 norm_modulate: str = "xla", rngs: nnx.Rngs):
        self.block_type = block_type
        self.fused_norm = norm_modulate == "fused"
        adaptive = block_type in ("adaln_zero", "adaln")
        self.norm1 = _norm(hidden_size, rngs, dtype, affine=not adaptive)
        self.attn = Attention(hidden_size, num_heads, dtype=dtype, implementation=attention, qkv=qkv, rngs=rngs)
        self.norm2 = _norm(hidden_size, rngs, dtype, affine=not adaptive)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dtype=dtype, gelu_backward=gelu_backward, rngs=rngs)
        if adaptive:
            n, init = (6, zeros) if block_type == "adaln_zero" else (4, xavier_uniform)
            self.adaLN_modulation = nnx.Sequential(nnx.silu, _linear(hidden_size, n * hidden_size, rngs, dtype, init))
        if block_type == "cross_attention":
            self.norm_cross = _norm(hidden_size, rngs, dtype, affine=True)
            self.cross_attn = Attention(hidden_size, num_heads, cross=True, dtype=dtype, implementation=attention,
                                        qkv=qkv, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """x: [N, T, D] tokens; c: [N, D] conditioning vector, or [N, 2, D] tokens for cross-attention."""
        if self.block_type == "adaln_zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.adaLN_modulation(c), 6, axis=-1)
            x = x + gate1[:, None] * self.attn(_adaptive_norm(self.norm1, x, shift1, scale1, self.fused_norm))
            return x + gate2[:, None] * self.mlp(_adaptive_norm(self.norm2, x, shift2, scale2, self.fused_norm))
        if self.block_type == "adaln":
            shift1, scale1, shift2, scale2 = jnp.split(self.adaLN_modulation(c), 4, axis=-1)
            x = x + self.attn(_adaptive_norm(self.norm1, x, shift1, scale1, self.fused_norm))
            return x + self.mlp(_adaptive_norm(self.norm2, x, shift2, scale2, self.fused_norm))
        x = x + self.attn(self.norm1(x))
        if self.block_type == "cross_attention":
            x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nnx.Module):
    """Norm (adaptive when the blocks are), then a zero-initialised linear decoder to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool,
                 *, dtype: Any, norm_modulate: str = "xla", rngs: nnx.Rngs):
        self.norm_final = _norm(hidden_size, rngs, dtype, affine=not adaptive)
        self.linear = _linear(hidden_size, patch_size * patch_size * out_channels, rngs, dtype, zeros)
        self.adaptive = adaptive
        self.fused_norm = norm_modulate == "fused"
        if adaptive:
            self.adaLN_modulation = nnx.Sequential(nnx.silu, _linear(hidden_size, 2 * hidden_size, rngs, dtype, zeros))

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        if self.adaptive:
            shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=-1)
            return self.linear(_adaptive_norm(self.norm_final, x, shift, scale, self.fused_norm))
        return self.linear(self.norm_final(x))


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """Modules of one structure as one module whose every variable gains a leading axis (``scan_blocks``)."""
    graphdef = nnx.graphdef(modules[0])
    states = [nnx.state(m) for m in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))


def _apply_blocks(blocks: nnx.List | DiTBlock, x: jax.Array, c: jax.Array | None, remat: str) -> jax.Array:
    """Run the transformer blocks on tokens ``x``: unrolled over a list, or one ``lax.scan`` over stacked blocks."""
    def run(block, x):
        return block(x, c)
    if remat != "none":
        run = nnx.remat(run, policy=model_compute.REMAT_POLICIES[remat])
    if isinstance(blocks, nnx.List):
        for block in blocks:
            x = run(block, x)
        return x
    graphdef, stacked = nnx.split(blocks)
    x, _ = jax.lax.scan(lambda x, state: (run(nnx.merge(graphdef, state), x), None), x, stacked)
    return x


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """[N, T, p*p*C] tokens (feature order p, p, C as the official decoder) -> [N, H, W, C]."""
    n, t, _ = x.shape
    h = w = int(round(math.sqrt(t)))
    x = x.reshape(n, h, w, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * patch_size, w * patch_size, channels)


class DiT(nnx.Module):
    """Diffusion Transformer over NHWC latents: ``model(x, t, y) -> eps (and variance values)``.

    The compute options (``dit_jax.model_compute``) change how, never what, it computes: ``dtype``
    is the compute type (parameters stay float32, the output is float32); ``remat`` recomputes block
    activations in the backward pass to save memory; ``attention`` picks
    ``jax.nn.dot_product_attention``'s kernel ("auto" is resolved here, where the head size is known:
    ``self.attention`` is the kernel used); ``qkv``, ``gelu_backward`` and ``norm_modulate`` choose how
    the passes around the matmuls are computed: same parameters, same values.
    ``scan_blocks`` stores the blocks' parameters stacked on a leading layer axis (``blocks`` is
    then one ``DiTBlock`` whose every variable is ``[depth, ...]``) and runs them as one
    ``lax.scan``: the program holds one block instead of ``depth``, so it traces and compiles
    faster; initialised with the same values as the unrolled list (``blocks[i]`` is layer ``i``).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block_type: str = "adaln_zero",
        guidance: str = "official",
        dtype: Any = jnp.float32,
        remat: str = "none",
        attention: str = "auto",
        qkv: str = "fused",
        gelu_backward: str = "saved",
        norm_modulate: str = "xla",
        scan_blocks: bool = False,
        rngs: nnx.Rngs,
    ):
        _check_config(input_size, patch_size, in_channels, hidden_size, depth, num_heads, class_dropout_prob,
                      num_classes, block_type, guidance, remat=remat, attention=attention, qkv=qkv,
                      gelu_backward=gelu_backward, norm_modulate=norm_modulate)
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.block_type = block_type
        self.guidance = guidance
        self.dtype = dtype
        self.remat = remat
        self.depth = depth
        self.scan_blocks = scan_blocks
        if attention == "auto":
            attention = model_compute.auto_attention(jnp.dtype(dtype).name, hidden_size // num_heads)
        self.attention = attention

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, dtype=dtype, rngs=rngs)
        self.t_embedder = TimestepEmbedder(hidden_size, dtype=dtype, rngs=rngs)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, dtype=dtype, rngs=rngs)
        table = sincos_2d_pos_embed(hidden_size, input_size // patch_size)
        self.pos_embed = PosEmbed(jnp.asarray(table[None], dtype=jnp.float32))
        blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio, block_type, dtype=dtype, attention=attention, qkv=qkv,
                           gelu_backward=gelu_backward, norm_modulate=norm_modulate, rngs=rngs)
                  for _ in range(depth)]
        self.blocks = stack_modules(blocks) if scan_blocks else nnx.List(blocks)
        adaptive = block_type in ("adaln_zero", "adaln")
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive, dtype=dtype,
                                      norm_modulate=norm_modulate, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [N, H, W, C] latents, t: [N] timesteps, y: [N] int labels (``num_classes`` = null).

        ``dropout_key`` turns on label dropout (training only). Returns [N, H, W, out_channels]
        in float32: eps in the first C channels, then the variance interpolation values.
        """
        self._check_inputs(x, t, y)
        tokens = self.x_embedder(x) + self.pos_embed[...].astype(self.dtype)
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, dropout_key)
        if self.block_type == "in_context":
            tokens = jnp.concatenate([t_emb[:, None].astype(tokens.dtype), y_emb[:, None].astype(tokens.dtype), tokens], axis=1)
            c = None
        elif self.block_type == "cross_attention":
            c = jnp.stack([t_emb, y_emb], axis=1)
        else:
            c = t_emb + y_emb
        tokens = _apply_blocks(self.blocks, tokens, c, self.remat)
        if self.block_type == "in_context":
            tokens = tokens[:, 2:]
        out = self.final_layer(tokens, c)
        return unpatchify(out, self.patch_size, self.out_channels).astype(jnp.float32)

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float | jax.Array) -> jax.Array:
        """Classifier-free guidance on a doubled batch: first half conditional, second half null.

        Only the first half of ``x`` is used (both halves are fed the same latents, as the
        official sampler does). eps = uncond + scale * (cond - uncond) on the first 3 channels
        ("official") or on all eps channels ("all"); the remaining channels pass through.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (conditional half, null half); got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        k = OFFICIAL_GUIDANCE_CHANNELS if self.guidance == "official" else self.in_channels
        eps, rest = out[..., :k], out[..., k:]
        cond, uncond = jnp.split(eps, 2, axis=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array) -> None:
        """Shape and label checks; label values are checked whenever they are concrete."""
        expected = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            hint = " (arrays are NHWC here; transpose NCHW inputs)" if x.ndim == 4 and x.shape[1] == self.in_channels else ""
            raise ValueError(f"DiT expects x of shape [N, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(x.shape)}{hint}")
        n = x.shape[0]
        if jnp.shape(t) != (n,) or jnp.shape(y) != (n,):
            raise ValueError(f"t and y must have shape [{n}] to match x; got t {jnp.shape(t)}, y {jnp.shape(y)}")
        if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
            raise ValueError(f"class labels y must be integers, got dtype {jnp.asarray(y).dtype}")
        check_labels(y, self.num_classes, allow_null=self.y_embedder.dropout_prob > 0)


def check_labels(y: Any, num_classes: int, *, allow_null: bool) -> None:
    """Raise if concrete labels fall outside [0, num_classes) (or == num_classes when null is allowed)."""
    if isinstance(y, jax.core.Tracer):
        return
    values = np.asarray(y)
    top = num_classes if allow_null else num_classes - 1
    if values.size and (values.min() < 0 or values.max() > top):
        null = f", or {num_classes} for the null label" if allow_null else ""
        raise ValueError(f"class labels must be in [0, {num_classes - 1}]{null}; got values in "
                         f"[{values.min()}, {values.max()}]")


def _check_config(input_size, patch_size, in_channels, hidden_size, depth, num_heads, class_dropout_prob,
                  num_classes, block_type, guidance, **compute: Any) -> None:
    """One error naming every problem of the architecture and of the ``compute`` arguments."""
    problems = []
    if block_type not in BLOCK_TYPES:
        problems.append(f"block_type {block_type!r} is not one of {BLOCK_TYPES}")
    if guidance not in GUIDANCE_MODES:
        problems.append(f"guidance {guidance!r} is not one of {GUIDANCE_MODES}")
    if patch_size < 1 or input_size % patch_size:
        problems.append(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
    if hidden_size % num_heads:
        problems.append(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if hidden_size % 4:
        problems.append(f"hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos position table)")
    if depth < 1 or in_channels < 1 or num_classes < 1:
        problems.append(f"depth, in_channels and num_classes must be >= 1 (got {depth}, {in_channels}, {num_classes})")
    if not 0.0 <= class_dropout_prob < 1.0:
        problems.append(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
    problems += model_compute.model_problems(head_dim=hidden_size // max(num_heads, 1), **compute)
    if problems:
        raise ValueError("invalid DiT config: " + "; ".join(problems))


# The 12 models of the paper (Table 4): width/heads/depth by size, times patch size.
SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
MODELS = {f"DiT-{size}/{p}": dict(arch, patch_size=p) for size, arch in SIZES.items() for p in (2, 4, 8)}
# What a paper name fixes; ``model.name=''`` gives them explicitly.
SIZE_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads")


def architecture(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ``DiT`` keyword arguments of a run's ``config.model`` (a ConfigDict or its saved JSON dict):
    the paper model ``name``'s sizes, or the explicit ``patch_size``/``hidden_size``/``depth``/``num_heads``
    when ``name`` is empty. The one place that decides "a paper model by name, or explicit sizes"."""
    m = dict(model)
    name = m.get("name")
    if name and name not in MODELS:
        raise ValueError(f"unknown model {name!r} (model.name); choose one of {', '.join(MODELS)}, "
                         "or set model.name='' and the sizes (model.patch_size, hidden_size, depth, num_heads)")
    sizes = MODELS[name] if name else {k: m[k] for k in SIZE_FIELDS}
    return dict(input_size=m["input_size"], in_channels=m["in_channels"], num_classes=m["num_classes"],
                mlp_ratio=m["mlp_ratio"], class_dropout_prob=m["class_dropout_prob"], learn_sigma=m["learn_sigma"],
                block_type=m["block_type"], guidance=m.get("guidance", "official"), **sizes)


def create_model(name: str, *, rngs: nnx.Rngs, **overrides: Any) -> DiT:
    """Build a paper model by name (e.g. ``"DiT-XL/2"``); overrides set input size, classes, etc."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return DiT(**{**MODELS[name], **overrides}, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Trainable parameters (the fixed position table is not one)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
