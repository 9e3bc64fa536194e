"""Export a DiT to the official PyTorch format or to a diffusers folder: ``python -m dit_jax.export``.

    python -m dit_jax.export --ckpt=runs/xl2 --out=DiT-XL-2-finetuned.pt           # official state dict
    python -m dit_jax.export --ckpt=runs/xl2 --out=dit_diffusers --format=diffusers  # DiTTransformer2DModel

``--ckpt`` is anything ``weights.load.load_dit`` reads (a workdir exports its newest EMA
weights). The official format is a plain ``state_dict`` with the names, layouts and float32
dtype of the released ``DiT-XL-2-256x256.pt`` (``torch.load`` + ``DiT.load_state_dict`` in the
official code); writing a ``.pt`` needs PyTorch, a ``.safetensors`` file of the same tensors
does not. The diffusers folder is ``config.json`` + ``diffusion_pytorch_model.safetensors``,
written without PyTorch, for ``DiTTransformer2DModel.from_pretrained(folder)``.

diffusers' DiT is not numerically the official one: it embeds timesteps with frequencies
exp(-ln(1e4) i / 127) (``downscale_freq_shift=1``) where the official DiT uses i / 128, and its
hub configs leave LayerNorm's epsilon at 1e-5 (the official 1e-6 is written here). The shift
is fixed in diffusers' code (``CombinedTimestepLabelEmbeddings``; ``DiTTransformer2DModel``'s
config has no field for it), so no exported config can change it: the export warns, and
``use_official_timesteps(model)`` after ``from_pretrained`` makes diffusers compute the
official forward (as the released ``facebook/DiT-XL-2-256`` needs too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

from dit_jax import console
from dit_jax import storage
from dit_jax.weights import convert, diffusers
from dit_jax.weights.load import LoadedDiT, load_dit

FORMATS = ("official", "diffusers")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def official_state_dict(loaded: LoadedDiT) -> dict[str, np.ndarray]:
    """The official ``state_dict`` of a loaded DiT, in the official module order, float32, contiguous."""
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in convert.to_official_state_dict(loaded.model).items()}


def export_official(loaded: LoadedDiT, path: str | os.PathLike) -> Path:
    """Write the official-format state dict to ``path`` (``.pt``/``.pth`` via torch.save; ``.safetensors`` without torch)."""
    path = Path(path)
    state = official_state_dict(loaded)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file
        _atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        return path
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"writing {path} (a PyTorch .pt) needs PyTorch: pip install torch (the CPU wheel is "
                          "enough), or export to a .safetensors file, which needs no PyTorch") from err
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}  # writable copies (jax arrays are read-only)
    _atomic(path, lambda tmp: torch.save(tensors, tmp))
    return path


def export_diffusers(loaded: LoadedDiT, folder: str | os.PathLike) -> Path:
    """Write a diffusers ``DiTTransformer2DModel`` folder (config.json + safetensors, no PyTorch needed)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    arch = loaded.info["architecture"]
    config = diffusers.diffusers_config(arch)
    tensors = diffusers.official_to_diffusers(official_state_dict(loaded), depth=arch["depth"])
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / DIFFUSERS_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _atomic(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    logging.warning("%s: diffusers' DiTTransformer2DModel embeds timesteps with downscale_freq_shift=1 (the official "
                    "DiT: 0; no config field sets it), so its output differs from this model's; after from_pretrained "
                    "call dit_jax.export.use_official_timesteps(model) (docs/weights.md#export)", folder)
    return folder


def use_official_timesteps(model: Any) -> Any:
    """Make a diffusers ``DiTTransformer2DModel`` embed timesteps as the official DiT does (frequencies
    exp(-ln(1e4) i / 128): ``downscale_freq_shift=0`` in every block's copy of the embedder); returns it."""
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def export(ckpt: str, out: str | os.PathLike, *, format: str = "official", **load_options) -> Path:
    """Load ``ckpt`` (any ``load_dit`` form) and write it to ``out`` in ``format``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    loaded = load_dit(ckpt, **load_options)
    return export_official(loaded, out) if format == "official" else export_diffusers(loaded, out)


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: a killed export never leaves a half-written file under the name."""
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    flags.DEFINE_string("ckpt", None, "What to export: a dit_jax workdir (its newest EMA weights), an official "
                        ".pt, a diffusers folder or hub id, or a registry name such as DiT-XL-2-256x256.pt.")
    flags.DEFINE_string("out", None, "Output: a .pt/.pth/.safetensors file (official) or a folder (diffusers).")
    flags.DEFINE_enum("format", "official", list(FORMATS), "official state dict or diffusers folder.")
    flags.DEFINE_string("model", None, "Check the checkpoint is this paper model (e.g. DiT-XL/2); also names the "
                        "heads of a plain state dict of a non-paper width.")
    flags.DEFINE_integer("num_heads", None, "Attention heads, for a plain state dict of a non-paper width.")
    flags.mark_flags_as_required(["ckpt", "out"])


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    path = export(f.ckpt, storage.absolute(f.out), format=f.format, model=f.model, num_heads=f.num_heads)
    print(f"wrote {path} ({f.format} format) from {f.ckpt}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
