"""Fine-tuning: a new run's first train state from ``config.train.init_from`` (any ``load_dit`` form).

Checked before the run starts (``init_from_problems``); the architectures must agree
(``architecture_settings`` names the ``model.*`` fields to set), the resolution and the class
count may differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dit_jax import models, storage
from dit_jax.models import SIZE_FIELDS
from dit_jax.weights import convert, fetch, load

LABEL_TABLE = "y_embedder.embedding_table.weight"


def init_from_problems(value: str) -> list[str]:
    """What is wrong with a ``train.init_from`` value (empty: nothing): it must be a registry DiT, an
    existing file or folder, or a hub id. Checked before a run starts."""
    if not value:
        return []
    if value in fetch.REGISTRY:
        entry = fetch.REGISTRY[value]
        if isinstance(entry, fetch.HubFolder) and entry.files != fetch.DIFFUSERS_DIT_FILES["files"]:
            return [f"train.init_from={value!r} is {entry.what}, not a DiT"]
        return []
    if Path(value).expanduser().exists() or fetch.is_hub_id(value):
        return []
    return [f"train.init_from={value!r} is neither an existing file or folder nor a registry name "
            f"({', '.join(n for n in fetch.REGISTRY if 'DiT' in n)}) nor a hub id"]


# The architecture fields a fine-tune must share with its checkpoint (``model.*``; the paper sizes are ``model.name``).
SHARED_FIELDS = (*SIZE_FIELDS, "in_channels", "mlp_ratio", "learn_sigma", "block_type")


def architecture_settings(ckpt: str, info: dict[str, Any], run: dict[str, Any], *,
                          heads_known: bool = True) -> str | None:
    """One line naming the ``model.*`` fields to set for the run ``run`` (``DiT`` keyword arguments) to
    fine-tune the checkpoint described by ``info`` (``load.LoadedDiT.info``); None when they already agree.
    ``heads_known``: False when the checkpoint's heads were not in the file (the run's stood in)."""
    theirs = info["architecture"]
    differ = [k for k in SHARED_FIELDS if theirs[k] != run[k] and (heads_known or k != "num_heads")]
    if not differ:
        return None
    settings = []
    if any(k in SIZE_FIELDS for k in differ):  # a paper model by its name, any other by its sizes
        settings = [f"model.name={info['model']}"] if info["model"] else ["model.name=''"] + [
            f"model.{k}={theirs[k]}" for k in SIZE_FIELDS if heads_known or k != "num_heads"]
    settings += [f"model.{k}={theirs[k]}" for k in differ if k not in SIZE_FIELDS]
    heads = "" if heads_known else " and model.num_heads to the checkpoint's (its file does not record heads)"
    return (f"train.init_from={ckpt!r} is {info['model'] or 'a custom DiT'} ("
            + ", ".join(f"{k} {theirs[k]}" for k in differ) + "), this run's model has "
            + ", ".join(f"{k} {run[k]}" for k in differ) + ": to fine-tune it set "
            + " ".join(f"--config.{s}" for s in settings) + heads
            + " (the resolution and the class count may differ)")


def init_train_state_from(ckpt: str, state: Any, *, architecture: dict[str, Any]) -> tuple[Any, dict[str, list[str]]]:
    """A fresh train state with the weights of ``ckpt`` (any ``load_dit`` form) in its params and EMA.

    ``state`` is a new run's initial state (its optimiser state stays fresh), ``architecture`` its
    model (``models.architecture``). The checkpoint may be at another resolution (the position
    table is fixed and recomputed by the new model; every parameter still fits) or have another
    class count (the label table keeps its fresh initialisation); another architecture is an
    error naming the ``model.*`` fields to set (``architecture_settings``). Arrays keep the
    shardings of ``state``. The run's heads stand in for heads a plain state dict does not record.
    Returns the state and ``{"loaded": [...], "not_loaded": [...]}`` (official names).
    """
    num_classes, heads_known = architecture["num_classes"], True
    try:
        loaded = load.load_dit(ckpt)
    except ValueError as err:
        if "num_heads" not in str(err):
            raise
        loaded = load.load_dit(ckpt, num_heads=architecture["num_heads"])  # a non-paper width: heads change no shape
        heads_known = False
    source, info = convert.to_official_state_dict(loaded.model), loaded.info
    del loaded  # only the arrays are needed (a DiT-XL/2 is 2.7 GB)
    wrong = architecture_settings(ckpt, info, architecture, heads_known=heads_known)
    if wrong:
        raise ValueError(wrong)
    flat = list(nnx.to_flat_state(state.params))
    report: dict[str, list[str]] = {"loaded": [], "not_loaded": []}
    misfits, new = [], {}
    for path, var in flat:
        name, leaf = convert.official_name(path), var[...]
        value = convert.from_official_layout(source[name], path, tuple(leaf.shape)) if name in source else None
        if value is None:
            if name == LABEL_TABLE and info["num_classes"] != num_classes:
                report["not_loaded"].append(name)
                new[path] = var
                continue
            misfits.append(f"{name}: checkpoint {tuple(np.shape(source[name])) if name in source else 'missing'}, "
                           f"this run {tuple(leaf.shape)} (our layout)")
            continue
        value = np.asarray(value, dtype=leaf.dtype)
        new[path] = var.replace(jax.make_array_from_callback(value.shape, leaf.sharding, lambda idx, v=value: v[idx]))
        report["loaded"].append(name)
    if misfits:  # the architectures agree: what is left is e.g. label dropout's extra row
        raise ValueError(f"train.init_from={ckpt!r} ({info['model'] or 'a custom DiT'} at {info['image_size']}px, "
                         f"{info['num_classes']} classes) does not fit this run's model in {len(misfits)} tensor(s): "
                         + "; ".join(misfits[:3]) + ("; ..." if len(misfits) > 3 else ""))
    params = nnx.from_flat_state(new)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params)), report


def create_initial_state(config: Any, init_state: Any, *, workdir: str | None = None) -> Any:
    """A new run's first train state: ``init_state()``, with ``config.train.init_from``'s weights when it is set.

    Called only when a run has no checkpoint of its own, so a resumed fine-tune restores its own
    steps and never reads ``init_from`` again. Logs what was and was not loaded, and process 0
    writes it to ``workdir/init_from.json``.
    """
    state, init_from = init_state(), config.train.init_from
    if not init_from:
        return state
    state, report = init_train_state_from(init_from, state, architecture=models.architecture(config.model))
    logging.info("initialised %d tensors from train.init_from=%s (fresh optimiser state; EMA = these weights)",
                 len(report["loaded"]), init_from)
    if report["not_loaded"]:
        logging.warning("not loaded from %s (freshly initialised): %s", init_from, ", ".join(report["not_loaded"]))
    if workdir is not None and jax.process_index() == 0:
        storage.write_atomic(storage.path(workdir) / "init_from.json", json.dumps({"init_from": init_from, **report},
                                                                                  indent=1))
    return state
