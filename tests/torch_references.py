"""The PyTorch side of the comparisons: the official DiT's reference vectors (``tests/data``), tiny random
diffusers models (a DiT, a VAE) and ``torch.save`` files in the official checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# The official code's reference vectors, kept in the repository so that a clone tests itself
# (tests/data/README.md says what each file is and where it came from).
REFERENCE_DIR = Path(__file__).resolve().parent / "data"


class Reference(NamedTuple):
    """Arrays produced by the official code (NCHW) and the tiny model's config."""

    arrays: dict[str, np.ndarray]
    config: dict[str, Any]


TINY_VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                latent_channels=4, sample_size=32)


def tiny_torch_vae(seed: int = 0):
    """A small random diffusers AutoencoderKL (perturbed so no weight is a trivial 0 or 1)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**TINY_VAE)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def official_state(reference: Reference) -> dict[str, np.ndarray]:
    """The reference's official ``state_dict`` (``param/*`` arrays, official names and layouts)."""
    return {k[len("param/"):]: v for k, v in reference.arrays.items() if k.startswith("param/")}


def save_torch(path: Path, obj: Any) -> Path:
    """``torch.save`` of ``obj`` with numpy arrays (at any depth of dicts) turned into tensors."""
    import torch

    def tensors(x):
        if isinstance(x, dict):
            return {k: tensors(v) for k, v in x.items()}
        return torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

    torch.save(tensors(obj), path)
    return path


TINY_DIFFUSERS_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)


def tiny_torch_dit(seed: int = 0, *, shared_embedders: bool = True):
    """A small random diffusers ``DiTTransformer2DModel`` (weights perturbed so none is a trivial 0 or 1).

    ``shared_embedders``: every block's timestep/label embedder equal to block 0's, as in a
    model converted from the official DiT (which has one of each).
    """
    import torch
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**TINY_DIFFUSERS_DIT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if shared_embedders:
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


def write_official_checkpoint(path: Path, model) -> Path:
    """``model``'s weights as an official-format ``.pt`` (a plain state dict of torch tensors, as the release)."""
    from dit_jax.weights import convert

    return save_torch(path, {k: np.array(v) for k, v in convert.to_official_state_dict(model).items()})
