"""``load_dit(ckpt)``: a ``DiT`` with its weights from any checkpoint a user has.

An official name (fetched), an official ``.pt`` (a plain state dict, or a training checkpoint
whose ``ema`` it takes), a diffusers DiT folder or hub id (safetensors, read without PyTorch),
or a dit_jax workdir (the EMA parameters of its newest intact Orbax checkpoint, and its saved
config). The architecture is read from the checkpoint; what the caller asks for is checked.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from dit_jax import checkpointing, storage
from dit_jax.model_compute import compute_options
from dit_jax.models import MODELS, SIZES, DiT, architecture, sincos_2d_pos_embed
from dit_jax.weights import convert, diffusers, fetch

class LoadedDiT(NamedTuple):
    """A DiT with its weights loaded, and what it is: ``info`` holds ``model`` (a paper name or
    ``None``), ``image_size``, ``input_size``, ``num_classes``, ``learn_sigma``, ``source``
    (``official`` | ``official-train`` | ``diffusers`` | ``workdir``), ``path`` and ``architecture``
    (the ``DiT`` keyword arguments), plus ``step`` for a workdir."""

    model: DiT
    info: dict[str, Any]


# SD-VAE latents: 8x downsampling, 4 channels. Checkpoints of other channel counts are pixel-space models.
LATENT_CHANNELS, LATENT_DOWNSAMPLE = 4, 8
ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
               "num_classes", "learn_sigma", "class_dropout_prob", "block_type")


def load_dit(ckpt: str, *, model: str | None = None, image_size: int | None = None,
             num_classes: int | None = None, learn_sigma: bool | None = None, num_heads: int | None = None,
             dtype: str = "float32",
             attention: str = "auto", cache: str | os.PathLike | None = None,
             offline: bool | None = None) -> LoadedDiT:
    """The DiT in ``ckpt`` with its weights, its architecture read from the checkpoint.

    ``ckpt``: a registry name (``DiT-XL-2-256x256.pt``, ``facebook/DiT-XL-2-256``: fetched into
    the cache), a local official ``.pt``/``.pth``/``.safetensors`` state dict or official
    training checkpoint, a diffusers DiT folder (``transformer/`` or the transformer folder
    itself) or hub id, or a dit_jax workdir (or its ``checkpoints/`` folder). ``model``,
    ``image_size``, ``num_classes`` and ``learn_sigma`` are checks (and name the heads of a
    plain state dict of a non-paper width): a checkpoint that differs raises a ValueError
    listing every mismatch. ``dtype``/``attention`` are the compute options (``model_compute.compute_options``).
    """
    kind, path = _resolve_dit(ckpt, cache=cache, offline=offline)
    options = compute_options(dtype, "none", attention)
    if kind == "workdir":
        return _load_workdir(path, options, checks=dict(model=model, image_size=image_size,
                                                        num_classes=num_classes, learn_sigma=learn_sigma))
    extra: dict[str, Any] = {}
    if kind == "diffusers":
        config, state_dict = diffusers.read_diffusers(path)
        arch = diffusers.diffusers_architecture(config, path)
        state_dict = diffusers.diffusers_to_official(state_dict, depth=arch["depth"], source=str(path))
        kind_label, name_hint = "diffusers", None
    else:
        state_dict, train_args = _read_official(path)
        kind_label = "official-train" if train_args is not None else "official"
        name_hint = getattr(train_args, "model", None) if train_args is not None else None
        arch = official_architecture(state_dict, source=str(path), model=model or name_hint,
                                     num_classes=num_classes, num_heads=num_heads)
        if train_args is not None:
            extra["train_args"] = {k: v for k, v in vars(train_args).items() if isinstance(v, (int, float, str, bool))}
    info = _describe_arch(arch, kind_label, path)
    _check_against(info, arch, dict(model=model, image_size=image_size, num_classes=num_classes,
                                    learn_sigma=learn_sigma), source=str(path))
    net = _build(arch, options)
    if "pos_embed" not in state_dict:  # diffusers recomputes the fixed table; so does the official model
        state_dict = {**state_dict, "pos_embed": np.asarray(net.pos_embed[...])}
    convert.load_official_state_dict(net, state_dict, source=str(path))
    return LoadedDiT(net, {**info, **extra})


def _resolve_dit(ckpt: str, *, cache, offline) -> tuple[str, Path]:
    """(kind, local path): kind is ``official`` (a weight file), ``diffusers`` (a folder) or ``workdir``."""
    if ckpt in fetch.REGISTRY:
        entry = fetch.REGISTRY[ckpt]
        if isinstance(entry, fetch.HubFolder) and entry.files != fetch.DIFFUSERS_DIT_FILES["files"]:
            raise ValueError(f"{ckpt} is {entry.what}, not a DiT")
        path = fetch.fetch(ckpt, cache=cache, offline=offline)
        return ("diffusers", path) if isinstance(entry, fetch.HubFolder) else ("official", path)
    # A run's workdir may be in a bucket (Orbax reads it there); weight files and diffusers folders are read locally.
    bucket = storage.is_bucket(ckpt)
    path = storage.path(ckpt) if bucket else Path(storage.absolute(ckpt))  # Orbax reads absolute paths only
    if path.is_file() and not bucket:
        return "official", path
    if path.is_dir():
        if (path / "checkpoints").is_dir() or any(p.name.isdigit() for p in path.iterdir()):
            return "workdir", path / "checkpoints" if (path / "checkpoints").is_dir() else path
        for folder in (path / "transformer", path):
            if (folder / "config.json").is_file() and not bucket:
                return "diffusers", folder
        raise FileNotFoundError(f"{path} is a folder but neither a dit_jax workdir (checkpoints/<step>/) nor a "
                                "diffusers DiT folder (transformer/config.json + diffusion_pytorch_model.safetensors)"
                                + (" on a local disk (copy one from the bucket with `gcloud storage cp -r`)" if bucket
                                   else ""))
    if bucket:
        raise FileNotFoundError(f"{ckpt} is not a folder in the bucket: of a bucket only a dit_jax workdir is read "
                                "directly; copy weight files to a local disk (`gcloud storage cp`)")
    if fetch.is_hub_id(ckpt):
        entry = fetch.HubFolder(ckpt, "a diffusers DiT", **fetch.DIFFUSERS_DIT_FILES)
        return "diffusers", fetch.fetch_hub(entry, cache=cache, offline=offline) / "transformer"
    known = ", ".join(n for n, e in fetch.REGISTRY.items() if "DiT" in n)
    raise FileNotFoundError(f"DiT checkpoint {ckpt!r} not found: give a local file or folder, or one of {known}")


def _read_official(path: Path) -> tuple[dict[str, np.ndarray], Any]:
    """An official-format state dict from ``path``, and the training ``args`` if it is a ``train.py`` checkpoint."""
    if path.suffix == ".safetensors":
        return fetch.read_weights(path), None
    import torch  # a .pt file: PyTorch reads it

    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py saves its argparse args
        obj = fetch.torch_load(str(path))
    args = None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        args = obj.get("args")  # the official find_model takes the EMA weights of a training checkpoint
        obj = obj["ema"]
    return fetch.torch_state_dict(obj, str(path)), args


_WHAT_IS_IT = (("encoder.conv_in.weight", "a VAE (AutoencoderKL) state dict"),
               ("Conv2d_1a_3x3.conv.weight", "an InceptionV3 state dict (the FID network)"),
               ("transformer_blocks.0.attn1.to_q.weight", "a diffusers DiT state dict: pass its folder instead"),
               ("model.diffusion_model.input_blocks.0.0.weight", "a Stable Diffusion / LDM U-Net checkpoint"))


def _not_a_dit(state_dict: dict[str, Any], source: str) -> ValueError:
    what = next((w for k, w in _WHAT_IS_IT if any(name.endswith(k) for name in state_dict)), None)
    keys = list(state_dict)[:6]
    return ValueError(f"{source} is not a DiT checkpoint: it holds {what or 'a state dict'} "
                      f"({len(state_dict)} tensors, e.g. {keys}); a DiT has x_embedder.proj.weight, blocks.N.* "
                      "and final_layer.*")


def official_architecture(state_dict: dict[str, np.ndarray], *, source: str, model: str | None = None,
                          num_classes: int | None = None, num_heads: int | None = None) -> dict[str, Any]:
    """The ``DiT`` keyword arguments an official-format state dict was made with, from its shapes.

    Heads are not visible in shapes: they come from ``model`` (a paper name) or ``num_heads``,
    else from the paper model of that width and depth; any other width needs one of them.
    """
    needed = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight")
    if any(k not in state_dict for k in needed):
        raise _not_a_dit(state_dict, source)
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    if "pos_embed" in state_dict:
        tokens = state_dict["pos_embed"].shape[1]
    else:
        raise ValueError(f"{source} has no pos_embed: the resolution cannot be read from it")
    grid = int(round(tokens ** 0.5))
    if "blocks.0.cross_attn.q.weight" in state_dict:
        block_type = "cross_attention"
    elif "blocks.0.adaLN_modulation.1.weight" in state_dict:
        block_type = "adaln_zero" if state_dict["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden else "adaln"
    else:
        block_type = "in_context"
    # Label dropout adds the null row; a table of exactly num_classes rows was trained without it.
    dropout = 0.0 if num_classes is not None and rows == num_classes else 0.1
    arch = dict(input_size=grid * patch, patch_size=int(patch), in_channels=int(in_channels), hidden_size=int(hidden),
                depth=depth, mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                num_classes=int(rows - (dropout > 0)), learn_sigma=out_channels == 2 * in_channels,
                class_dropout_prob=dropout, block_type=block_type)
    if model is not None and model in MODELS:
        arch["num_heads"] = MODELS[model]["num_heads"] if num_heads is None else num_heads
    elif num_heads is not None:
        arch["num_heads"] = num_heads
    else:
        paper = [size for size, a in SIZES.items() if (a["hidden_size"], a["depth"]) == (hidden, depth)]
        if not paper:
            raise ValueError(f"{source} is a DiT of width {hidden} and depth {depth}, not a paper model: its number "
                             "of attention heads is not in the file; give it with --num_heads N (sample, export; "
                             "num_heads= in load_dit)")
        arch["num_heads"] = SIZES[paper[0]]["num_heads"]
    return arch


def paper_name(arch: dict[str, Any]) -> str | None:
    """``DiT-XL/2`` etc. when the architecture is a paper model's (any resolution and class count)."""
    keys = ("patch_size", "hidden_size", "depth", "num_heads")
    return next((n for n, a in MODELS.items() if all(a[k] == arch[k] for k in keys)
                 and arch["mlp_ratio"] == 4.0 and arch["block_type"] == "adaln_zero"), None)


def _describe_arch(arch: dict[str, Any], source: str, path: Path) -> dict[str, Any]:
    latent = arch["in_channels"] == LATENT_CHANNELS
    return {"model": paper_name(arch),
            "image_size": arch["input_size"] * (LATENT_DOWNSAMPLE if latent else 1),
            "input_size": arch["input_size"], "num_classes": arch["num_classes"], "learn_sigma": arch["learn_sigma"],
            "source": source, "path": str(path), "architecture": dict(arch)}


def _check_against(info: dict[str, Any], arch: dict[str, Any], asked: dict[str, Any], *, source: str) -> None:
    """Raise a ValueError listing every asked property the checkpoint does not have."""
    wrong = []
    if asked["model"] is not None:
        if asked["model"] not in MODELS:
            raise ValueError(f"unknown model {asked['model']!r}; choose one of {', '.join(MODELS)}")
        want = MODELS[asked["model"]]
        differ = [f"{k} {arch[k]} (asked {want[k]})" for k in ("patch_size", "hidden_size", "depth", "num_heads")
                  if arch[k] != want[k]]
        if differ:
            wrong.append(f"model: the checkpoint is {info['model'] or 'a custom DiT'} ({', '.join(differ)}), "
                         f"asked {asked['model']}")
    for key in ("image_size", "num_classes", "learn_sigma"):
        if asked[key] is not None and asked[key] != info[key]:
            wrong.append(f"{key}: the checkpoint has {info[key]}, asked {asked[key]}")
    if wrong:
        raise ValueError(f"{source} is not the DiT asked for:\n  " + "\n  ".join(wrong)
                         + "\nLeave those settings out to use the checkpoint's, or pick the checkpoint made for them.")


def _build(arch: dict[str, Any], options: dict[str, Any]) -> DiT:
    """The DiT of ``arch`` with zero weights (to be loaded) and the fixed position table computed."""
    net = convert.materialise(nnx.eval_shape(lambda: DiT(**arch, **options, rngs=nnx.Rngs(0))))
    table = sincos_2d_pos_embed(arch["hidden_size"], arch["input_size"] // arch["patch_size"])
    net.pos_embed[...] = np.asarray(table[None], np.float32)
    return net



def _load_workdir(checkpoints: Path, options: dict[str, Any], *, checks: dict[str, Any]) -> LoadedDiT:
    """The EMA weights of the newest intact step in ``checkpoints`` and the DiT of its saved config."""
    failures = []

    def unreadable(step: int, reason: str) -> None:
        failures.append(f"step {step}: {reason}")
        logging.warning("checkpoint %s/%d cannot be read (%s); trying the previous one", checkpoints, step, failures[-1])

    for step in sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), reverse=True):
        try:
            config = _saved_config(checkpoints / str(step))
        except Exception as err:  # any failure to read a step: try the previous one
            unreadable(step, checkpointing.error_line(err))
            continue
        # Committed as the run's train.checkpoint_atomicity says (commit_file: its commit_success.txt), as on resuming.
        atomicity = checkpointing.atomicity_options(config.get("train", {}).get("checkpoint_atomicity", "auto"))
        if not checkpointing.is_committed(checkpoints / str(step), atomicity):
            unreadable(step, "never committed (its save did not finish: no commit_success.txt)")
            continue
        arch = architecture(config["model"])
        info = {**_describe_arch(arch, "workdir", checkpoints), "step": step}
        _check_against(info, arch, checks, source=f"{checkpoints} (step {step})")
        try:
            ema = restore_ema(checkpoints / str(step))
        except Exception as err:
            unreadable(step, checkpointing.error_line(err))
            continue
        net = _build(arch, options)
        convert.load_checked(_param_variables(net), ema, lambda path: ".".join(map(str, path)), pytorch_layout=False,
                             header=f"the EMA parameters of {checkpoints}/{step} do not fit the DiT of its config:")
        return LoadedDiT(net, info)
    if not failures:
        raise FileNotFoundError(f"{checkpoints} holds no checkpoint (no step directories)")
    # The errors themselves, not a verdict: a step that cannot be read here may be intact (permissions, a mount).
    raise FileNotFoundError(f"none of the checkpoints in {checkpoints} can be read: " + "; ".join(failures))


def _saved_config(step_dir: Path) -> dict[str, Any]:
    return json.loads((step_dir / "config" / "metadata").read_text())  # where Orbax's JsonSave puts the config


def restore_ema(step_dir: Path) -> dict[str, np.ndarray]:
    """The EMA parameters of one checkpoint step as ``{dotted path: numpy array}``; nothing else is read."""
    state_dir = step_dir / "state"
    # The handler's metadata, not the checkpointer's: that one turns any read error into empty metadata.
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    checkpointer = ocp.PyTreeCheckpointer()
    if "ema_params" not in tree:
        raise ValueError(f"{state_dir} is not a dit_jax train state (no ema_params)")
    item = {"ema_params": tree["ema_params"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                           partial_restore=True))
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(restored["ema_params"])[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        flat[".".join(keys[:-1] if keys[-1] == "value" else keys)] = np.asarray(value)
    return flat


def _param_variables(net: DiT) -> dict[tuple, Any]:
    return dict(nnx.to_flat_state(nnx.state(net, nnx.Param)))
