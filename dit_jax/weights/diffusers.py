"""diffusers' ``DiTTransformer2DModel``: its folder, its config and its tensor names <-> the official DiT's.

diffusers keeps a copy of the timestep and label embedders in every block and splits ``qkv``;
``diffusers_to_official`` / ``official_to_diffusers`` map between the two name sets (numpy
arrays, no PyTorch), ``diffusers_config`` writes the ``config.json`` of an architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.weights import fetch

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# One official name -> the diffusers names of its copies ({i}: the block; embedders repeat in every block).
_DIFFUSERS_GLOBAL = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
                     "final_layer.linear": "proj_out_2"}
_DIFFUSERS_EMBEDDERS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
                        "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
                        "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
_DIFFUSERS_BLOCK = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
                    "mlp.fc2": "ff.net.2"}
_QKV = ("to_q", "to_k", "to_v")


def read_diffusers(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A diffusers DiT folder's ``config.json`` and its weights (safetensors, else the ``.bin``)."""
    with open(folder / "config.json") as f:
        config = json.load(f)
    weights = [folder / Path(w).name for w in fetch.DIFFUSERS_DIT_FILES["weights"] if (folder / Path(w).name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder} has a config.json but no diffusion_pytorch_model.safetensors (or .bin)")
    return config, fetch.read_weights(weights[0])


def diffusers_architecture(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``DiT`` keyword arguments from a diffusers ``config.json``; anything else than a DiT is an error."""
    cls = config.get("_class_name")
    if cls not in DIFFUSERS_CLASSES or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"{folder} holds a diffusers {cls} (norm_type {config.get('norm_type')!r}), not a DiT "
                         "(DiTTransformer2DModel with norm_type 'ada_norm_zero')")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    return dict(input_size=config["sample_size"], patch_size=config["patch_size"], in_channels=in_channels,
                hidden_size=hidden, depth=config["num_layers"], num_heads=config["num_attention_heads"],
                mlp_ratio=4.0, num_classes=config["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels,
                class_dropout_prob=0.1, block_type="adaln_zero")


def diffusers_to_official(state_dict: dict[str, np.ndarray], *, depth: int, source: str) -> dict[str, np.ndarray]:
    """A diffusers ``DiTTransformer2DModel`` state dict in the official names and layouts.

    diffusers keeps a copy of the timestep and label embedders in every block (its forward uses
    block 0's for the final layer); they must all be equal, as in a converted official model,
    since the official architecture has one. q, k and v are concatenated into ``qkv``.
    """
    sd = dict(state_dict)
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in sd:
            raise ValueError(f"{source} is missing {name}: not a complete diffusers DiT")
        return sd.pop(name)

    for ours, theirs in _DIFFUSERS_GLOBAL.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    differing = []
    for ours, theirs in _DIFFUSERS_EMBEDDERS.items():
        for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
            copies = [take(f"transformer_blocks.{i}.{theirs}.{p}") for i in range(depth)]
            if any(not np.array_equal(c, copies[0]) for c in copies[1:]):
                differing.append(f"{theirs}.{p}")
            out[f"{ours}.{p}"] = copies[0]
    if differing:
        raise ValueError(f"{source}: the blocks hold different copies of {', '.join(differing)} (trained as "
                         "separate embedders in diffusers); the official DiT has one timestep and one label "
                         "embedder, so this model cannot be loaded without changing what it computes")
    for i in range(depth):
        for ours, theirs in _DIFFUSERS_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = take(f"transformer_blocks.{i}.{theirs}.{p}")
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(
                [take(f"transformer_blocks.{i}.attn1.{q}.{p}") for q in _QKV], axis=0)
    if sd:
        raise ValueError(f"{source} has tensors a DiT does not: {sorted(sd)[:10]}")
    return out


def official_to_diffusers(state_dict: dict[str, np.ndarray], *, depth: int) -> dict[str, np.ndarray]:
    """The inverse of ``diffusers_to_official`` (embedders copied into every block, qkv split)."""
    out: dict[str, np.ndarray] = {}
    for ours, theirs in _DIFFUSERS_GLOBAL.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state_dict[f"{ours}.{p}"]
    for i in range(depth):
        for ours, theirs in _DIFFUSERS_EMBEDDERS.items():
            for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
                out[f"transformer_blocks.{i}.{theirs}.{p}"] = state_dict[f"{ours}.{p}"]
        for ours, theirs in _DIFFUSERS_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"transformer_blocks.{i}.{theirs}.{p}"] = state_dict[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            for q, part in zip(_QKV, np.split(state_dict[f"blocks.{i}.attn.qkv.{p}"], 3, axis=0)):
                out[f"transformer_blocks.{i}.attn1.{q}.{p}"] = part
    return out


def diffusers_config(arch: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a ``DiTTransformer2DModel`` with ``arch`` (the official LayerNorm epsilon, 1e-6)."""
    problems = [f"{k}={arch[k]!r}" for k, v in (("block_type", "adaln_zero"), ("mlp_ratio", 4.0),
                                                ("class_dropout_prob", 0.1)) if arch[k] != v]
    if problems:
        raise ValueError("diffusers' DiTTransformer2DModel is adaLN-Zero with MLP ratio 4 and label dropout 0.1; "
                         "this DiT has " + ", ".join(problems))
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": arch["num_heads"],
            "attention_head_dim": arch["hidden_size"] // arch["num_heads"], "in_channels": arch["in_channels"],
            "out_channels": arch["in_channels"] * (2 if arch["learn_sigma"] else 1), "num_layers": arch["depth"],
            "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": arch["input_size"],
            "patch_size": arch["patch_size"], "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": arch["num_classes"], "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": 1e-6}
