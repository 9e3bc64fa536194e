"""The Stable Diffusion VAE (``AutoencoderKL``) in Flax NNX, loading diffusers-format weights.

DiT trains on this VAE's latents: ``encode`` maps [-1, 1] RGB images (NHWC) to the
posterior's mean and log-variance at 1/8 resolution, ``decode`` maps latents back.
Module and attribute names follow diffusers (``encoder.down_blocks.0.resnets.0.conv1``...),
so a diffusers checkpoint (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
``.bin``) loads name for name; kernels are transposed to NHWC layouts on the way in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.weights import fetch
from dit_jax.weights.convert import load_checked, materialise

HUB_VAES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")  # entries of weights.fetch.REGISTRY
WEIGHT_FILES = fetch.VAE_FILES["weights"]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The ``config.json`` fields of a diffusers ``AutoencoderKL`` that shape the network."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: Mapping) -> VAEConfig:
        """Read a diffusers ``config.json`` dict; anything this module does not implement is an error."""
        unsupported = []
        if config.get("act_fn", "silu") != "silu":
            unsupported.append(f"act_fn={config['act_fn']!r}")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != want for t in config.get(key, [want])):
                unsupported.append(f"{key}={config[key]}")
        if config.get("shift_factor") is not None:
            unsupported.append(f"shift_factor={config['shift_factor']}")
        if unsupported:
            raise ValueError("not a Stable Diffusion AutoencoderKL this module implements: " + ", ".join(unsupported))
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def _conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, *, stride: int = 1, padding=None) -> nnx.Conv:
    pad = kernel // 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding or ((pad, pad), (pad, pad)),
                    rngs=rngs)


def _norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Exact two-pass variance, as torch.nn.GroupNorm computes it.
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs)


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 projected shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, groups, rngs)
        self.conv1 = _conv(cin, cout, 3, rngs)
        self.norm2 = _norm(cout, groups, rngs)
        self.conv2 = _conv(cout, cout, 3, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.group_norm = _norm(channels, groups, rngs)
        self.to_q = nnx.Linear(channels, channels, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(channels, channels, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, 1, c)  # [B, T, heads=1, C]
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
        return x + self.to_out[0](out.astype(x.dtype)).reshape(b, h, w, c)


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after padding one pixel on the bottom and right only."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ResampleBlock(nnx.Module):
    """``num_layers`` resnets, then an optional down- or upsampler (diffusers' Down/UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, num_layers: int, groups: int, resample: str | None, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs)
                                 for i in range(num_layers)])
        if resample == "down":
            self.downsamplers = nnx.List([Downsample(cout, rngs=rngs)])
        elif resample == "up":
            self.upsamplers = nnx.List([Upsample(cout, rngs=rngs)])
        self.resample = resample

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class MidBlock(nnx.Module):
    """resnet, (attention), resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, rngs=rngs)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nnx.Module):
    """Image -> concatenated posterior (mean, log-variance), downsampled by 2 per block but the last."""

    def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs):
        widths, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = _conv(c.in_channels, widths[0], 3, rngs)
        self.down_blocks = nnx.List([
            ResampleBlock(widths[max(i - 1, 0)], w, c.layers_per_block, groups,
                          "down" if i < len(widths) - 1 else None, rngs=rngs)
            for i, w in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], groups, c.mid_block_add_attention, rngs=rngs)
        self.conv_norm_out = _norm(widths[-1], groups, rngs)
        self.conv_out = _conv(widths[-1], 2 * c.latent_channels, 3, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent -> image, upsampled by 2 per block but the last, one more resnet per block than the encoder."""

    def __init__(self, c: VAEConfig, *, rngs: nnx.Rngs):
        widths, groups = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = _conv(c.latent_channels, widths[0], 3, rngs)
        self.mid_block = MidBlock(widths[0], groups, c.mid_block_add_attention, rngs=rngs)
        self.up_blocks = nnx.List([
            ResampleBlock(widths[max(i - 1, 0)], w, c.layers_per_block + 1, groups,
                          "up" if i < len(widths) - 1 else None, rngs=rngs)
            for i, w in enumerate(widths)])
        self.conv_norm_out = _norm(widths[-1], groups, rngs)
        self.conv_out = _conv(widths[-1], c.out_channels, 3, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL-regularised autoencoder of Stable Diffusion (NHWC; images in [-1, 1])."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        latent2 = 2 * config.latent_channels
        self.quant_conv = _conv(latent2, latent2, 1, rngs) if config.use_quant_conv else None
        self.post_quant_conv = (_conv(config.latent_channels, config.latent_channels, 1, rngs)
                                if config.use_post_quant_conv else None)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, H, W, 3] in [-1, 1] -> posterior (mean, logvar), each [B, H/8, W/8, latent_channels]."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, 8h, 8w, 3] (about [-1, 1])."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


# ---------------------------------------------------------------- diffusers weights

_RENAMES = {"kernel": "weight", "scale": "weight"}
# Attention names in checkpoints written by older diffusers releases (converted on load, as diffusers does).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_name(path: tuple) -> str:
    """Our state path, e.g. ``('encoder', 'conv_in', 'kernel')`` -> ``encoder.conv_in.weight``."""
    parts = [str(p) for p in path]
    parts[-1] = _RENAMES.get(parts[-1], parts[-1])
    return ".".join(parts)


def _modern_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
        parts[-2] = _LEGACY_ATTENTION[parts[-2]]
    return ".".join(parts)


def load_state_dict(model: AutoencoderKL, state_dict: Mapping[str, np.ndarray], *, source: str) -> None:
    """Copy a diffusers ``state_dict`` into ``model`` in place, after checking every name and shape."""
    load_checked(dict(nnx.to_flat_state(nnx.state(model, nnx.Param))),
                 {_modern_name(k): v for k, v in state_dict.items()}, diffusers_name,
                 header=f"{source} does not fit the AutoencoderKL built from its config.json:")


def resolve(name_or_path: str, *, cache_dir: str | None = None, offline: bool | None = None) -> str:
    """A local diffusers VAE folder for ``name_or_path``: a folder, or a hub id (``HUB_VAES``, or any other
    diffusers VAE repository) fetched into ``fetch.cache_dir()`` (or ``cache_dir``)."""
    local = fetch.name_or_path(name_or_path)
    if os.path.isdir(local):
        return local
    if not fetch.is_hub_id(name_or_path):
        what = "is not a folder" if os.path.exists(local) else f"does not exist (no such folder: {local})"
        raise FileNotFoundError(f"VAE {name_or_path!r} {what}: pass a folder with config.json and "
                                f"{' or '.join(WEIGHT_FILES)}, or a Hugging Face hub id such as {HUB_VAES[0]!r}")
    entry = fetch.REGISTRY.get(name_or_path) or fetch.HubFolder(name_or_path, "a diffusers VAE", **fetch.VAE_FILES)
    try:
        return str(fetch.fetch_hub(entry, cache=cache_dir, offline=offline))
    except FileNotFoundError as err:  # a mistyped folder reads like a hub id: say that none exists either
        raise FileNotFoundError(f"VAE {name_or_path!r}: there is no such local folder "
                                f"({os.path.abspath(name_or_path)}), and as a hub id: {err}") from err


def weights_file(folder: str) -> str:
    """The weight file of a diffusers VAE folder (safetensors first), checked together with its config.json."""
    weights = [os.path.join(folder, f) for f in WEIGHT_FILES if os.path.exists(os.path.join(folder, f))]
    if not os.path.exists(os.path.join(folder, "config.json")) or not weights:
        raise FileNotFoundError(f"{folder} is not a diffusers VAE folder: it needs config.json and one of "
                                f"{', '.join(WEIGHT_FILES)} (as AutoencoderKL.save_pretrained writes them)")
    return weights[0]


def load_vae(name_or_path: str, *, cache_dir: str | None = None, offline: bool | None = None) -> AutoencoderKL:
    """The VAE in a diffusers folder (``config.json`` + weights) or hub id, with its weights loaded."""
    folder = resolve(name_or_path, cache_dir=cache_dir, offline=offline)
    weights = weights_file(folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = VAEConfig.from_diffusers(json.load(f))
    model = materialise(nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0))))
    load_state_dict(model, fetch.read_weights(weights), source=weights)
    return model
