"""The benchmark's runs side by side with PyTorch: the training step (PyTorch first where asked, then
ours) and guided sampling per per-device batch (``torch_reference`` against ``measure``).

PyTorch runs first: JAX keeps the device memory it takes (by default it reserves 75% of a GPU at
its first use), so PyTorch after it would run out of memory on a large model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from dit_jax.perf import measure, torch_reference


def _hours_per_50k(side: dict[str, Any]) -> float:
    return 50_000 / side["images_per_sec"] / 3600


def sample_side_by_side(config: ml_collections.ConfigDict, *, num_steps: int, cfg_scale: float, repeats: int,
                        per_device_batches: Sequence[int] = (), decode: bool = True) -> dict[str, Any]:
    """Guided sampling, PyTorch (official-style eager loop, diffusers' DiT) first, then ours, one row per
    per-device batch (default: ``train.batch_size`` over the devices), each chain with the VAE decode.

    PyTorch runs on one device with the per-device batch, in ``config.dtype`` (bfloat16: autocast)
    and in float32 with TF32 (``torch_tf32``, the official ``sample_ddp.py``'s settings); ours over
    all devices. Each side gets images/s and hours per 50K samples; ``torch_over_jax_sample_time``
    compares per-device images/s (PyTorch's / ours: > 1 = ours faster).
    """
    devices = jax.device_count()
    per_device_batches = list(per_device_batches) or [config.train.batch_size // devices]
    if min(per_device_batches) < 1:
        raise ValueError(f"per-device batches must be >= 1, got {per_device_batches}")
    result: dict[str, Any] = {"model": config.model.name or "custom", "latent_size": config.model.input_size,
                              "dtype": config.dtype, "sample_steps": num_steps, "cfg_scale": cfg_scale,
                              "repeats": repeats, "vae_decode": decode, "load_average": os.getloadavg(), "rows": []}
    for per_device in per_device_batches:
        row_config = config.copy_and_resolve_references()
        row_config.train.batch_size = per_device
        row: dict[str, Any] = {"per_device_batch": per_device}
        for name, tf32 in (("torch", False), ("torch_tf32", True)):
            row[name] = torch_reference.torch_sample_benchmark(row_config, num_steps=num_steps, cfg_scale=cfg_scale,
                                                               repeats=repeats, tf32=tf32, decode=decode)
        row_config.train.batch_size = per_device * devices
        row["jax"] = measure.jax_sample_benchmark(row_config, num_steps=num_steps, cfg_scale=cfg_scale,
                                                  repeats=repeats, decode=decode)
        for side in ("torch", "torch_tf32", "jax"):
            row[side]["hours_per_50k"] = _hours_per_50k(row[side])
        row["torch_over_jax_sample_time"] = {side: row["jax"]["images_per_sec"] / devices / row[side]["images_per_sec"]
                                             for side in ("torch", "torch_tf32")}
        result["rows"].append(row)
    result["load_average_after"] = os.getloadavg()
    return result


def run(config: ml_collections.ConfigDict, *, steps: int, warmup: int, sample_steps: int, cfg_scale: float,
        with_torch: bool, torch_compile: bool | str = False, profile_dir: str | None = None,
        started: float = measure.IMPORTED) -> dict[str, Any]:
    """All benchmarks ``config`` asks for, as one JSON-ready dict: the train step (PyTorch's first, with
    ``with_torch``), then ``sample_steps`` of guided sampling (none if 0). ``started``: the start the
    train step's ``since_start_seconds`` counts from (``measure.train_benchmark``)."""
    result: dict[str, Any] = {"model": config.model.name or "custom", "latent_size": config.model.input_size}
    if with_torch:
        result["torch_train"] = torch_reference.torch_train_benchmark(config, steps=steps, warmup=warmup,
                                                                      torch_compile=torch_compile)
    result["train"] = measure.train_benchmark(config, steps=steps, warmup=warmup, profile_dir=profile_dir,
                                              started=started)
    if with_torch:
        result["torch_over_jax_step_time"] = {
            stat: result["torch_train"][f"step_seconds_{stat}"] / result["train"][f"step_seconds_{stat}"]
            for stat in ("median", "min")}
    if sample_steps:
        result["sample"] = measure.sample_benchmark(config, num_steps=sample_steps, cfg_scale=cfg_scale)
    return result
