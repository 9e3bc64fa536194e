"""Throughput of the training step and of guided sampling, with FLOPs and MFU; optionally vs PyTorch.

``python -m dit_jax.benchmark --model DiT-XL/2 --batch 32 --steps 20 --dtype bfloat16`` times
the project's real jitted train step (``train.make_train_step``: hybrid loss, label dropout,
AdamW, EMA) on a fixed on-device batch of random latents, so no input pipeline is measured,
with the state and batch laid out on a device mesh (``sharding.py``; ``--mesh``), then a
guided DDPM run (``engine.generate``, 250 steps unless ``--sample_steps``). Each timed call
ends with ``block_until_ready``; warm-up calls (compilation included) are not timed.

Train FLOPs come from XLA's cost analysis of the step (see ``flops.py``: a multiply-add is
two flops; everything the step computes counts, optimiser and EMA included). They are
counted on the lowered, global program, before XLA's fusion duplicates cheap elementwise
work into several kernels (the compiled per-device count times the devices is a few %
higher on tiny models): these are the model's flops, so the ratio to the devices' dense
peak for ``--dtype`` is the MFU, "unknown" where the device is not in
``flops.peak_flops_per_device``'s table.

``--torch`` also times the same model and batch in PyTorch on the CPU or CUDA device:
diffusers' ``DiTTransformer2DModel`` (see ``torch_reference.torch_train_benchmark`` for what each side computes).

``--loader_dir DIR`` instead measures the training input: the latents/s that the grain
pipeline over an ``extract_latents`` folder delivers on this host (shuffled reads, a fresh
posterior sample and a random flip per latent, batched, prefetched).

``--inception`` instead measures the evaluator's feature extractor (``dit_jax.evaluate``'s TF1
resize to 299 and the FID InceptionV3 in float32 ``precision=HIGHEST``): images/s on random
uint8 ``--image_size`` images (random weights unless ``--inception_weights``).
"""

from __future__ import annotations

import time

_MODULE_START = time.perf_counter()  # before jax's import: start-up figures count the imports too

import concurrent.futures
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import compilation_cache, console, flops, input_pipeline, latents, sharding, torch_reference, train
from dit_jax.models import ATTENTION_IMPLEMENTATIONS, DTYPES, MODELS, REMAT_MODES, SWITCH_FIELDS, count_params
from dit_jax.recipes import paper_config
from dit_jax.sampling import engine
from dit_jax.timing import summary, timed


def random_batch(config: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
    """A batch of standard-normal latents and uniform labels, shaped as ``config`` says."""
    m, n = config.model, config.train.batch_size
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, m.input_size, m.input_size, m.in_channels), np.float32),
            "label": rng.integers(0, m.num_classes, n, dtype=np.int32)}


# The compiled train step's HLO text, written beside a profile (its op names are the trace's).
PROFILE_HLO = "train_step.hlo.txt"


def peak_memory_bytes() -> int | None:
    """The most device memory any local device has held (its allocator's peak), or None where the
    backend keeps no statistics (CPUs)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def train_benchmark(config: ml_collections.ConfigDict, *, steps: int, warmup: int, count_flops: bool = True,
                    profile_dir: str | None = None, profile_steps: int = 3) -> dict[str, Any]:
    """Step time, images/s, train FLOPs per image and MFU of ``train.make_train_step`` on ``config``.

    The state and batch are placed on the mesh ``config.mesh`` over all devices. ``startup``
    splits the time to the first finished step: creating the state, tracing/lowering the step,
    compiling it, the first call; the FLOP count (a CPU lowering, skipped with ``count_flops=False``)
    runs in a thread meanwhile, and ``flops_count`` is only what it took beyond them (waited for
    after the first step, before the timed ones, so it is not part of ``since_start_seconds``).
    The MFU uses that count (``flops_source`` "lowered_cpu"), else the compiled program's
    ("compiled"), which is reported beside it (``compiled_flops_per_image``); ``since_start_seconds`` is measured from this module's import (before jax's),
    which for ``python -m dit_jax.benchmark`` is the start of the command. With ``profile_dir``,
    ``profile_steps`` more steps are traced there (``jax.profiler``, with a Perfetto JSON trace)
    beside the compiled program's text (``PROFILE_HLO``), for ``sweep.time_split``.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1 (the first call compiles), got {steps}, {warmup}")
    num_devices = jax.device_count()
    sharding.check_config(config, num_devices)
    mesh = sharding.create_mesh(config.mesh)
    startup, clock = {}, time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        startup[f"{name}_seconds"], clock = now - clock, now

    graphdef, fixed, state = train.create_train_state(config, mesh)  # as the trainer: sharded from the start
    batch = sharding.global_batch(random_batch(config, config.seed + 1), mesh)
    jax.block_until_ready((state, batch))
    phase("init")
    diffusion = train.build_diffusion(config)
    step_fn = train.make_train_step(config, graphdef, fixed, diffusion, mesh, state)
    lowered = step_fn.lower(state, batch)
    phase("trace")
    hits = compilation_cache.hits()

    def call():
        nonlocal state
        state, metrics = compiled(state, batch)
        return state, metrics

    # The CPU count runs in a thread while XLA compiles and the first step runs (with a warm compilation
    # cache it outlasts both); it is waited for before the timed steps, which it must not slow.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lowered_count = pool.submit(train.step_flops, config, graphdef, fixed, diffusion, state) if count_flops else None
        compiled = lowered.compile()
        phase("compile")
        jax.block_until_ready(call())
        phase("first_step")
        startup["since_start_seconds"] = clock - _MODULE_START
        flop_counts = _flop_counts(compiled, lowered_count, num_devices)
    if count_flops:
        phase("flops_count")  # only the part of the CPU count that outlasted the compile and the first step
    flops_per_step = flop_counts.get("flops_per_step")
    seconds = timed(call, steps, warmup - 1)
    model = nnx.merge(graphdef, state.params, fixed)
    result = {"num_params": count_params(model), "num_devices": num_devices,
              "mesh": dict(mesh.shape), "device_kind": jax.devices()[0].device_kind, "dtype": config.dtype,
              "remat": config.remat, "attention": model.attention, "scan_blocks": bool(config.model.scan_blocks),
              **{field: config[field] for field in SWITCH_FIELDS},
              "batch": config.train.batch_size, "steps": steps, **summary(seconds, config.train.batch_size),
              "peak_memory_bytes": peak_memory_bytes(), "startup": startup, "compilation_cache": {
                  "dir": jax.config.jax_compilation_cache_dir, "warm": compilation_cache.hits() > hits},
              "train_flops_per_image": None if flops_per_step is None else flops_per_step / config.train.batch_size,
              "flops_source": flop_counts.get("source"), "compiled_flops_per_image":
              None if flop_counts.get("compiled") is None else flop_counts["compiled"] / config.train.batch_size}
    if flops_per_step is not None:
        result.update(_utilisation(flops_per_step / result["step_seconds_median"], config.dtype))
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        with open(os.path.join(profile_dir, PROFILE_HLO), "w") as f:
            f.write(compiled.as_text())
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            profiled = timed(call, profile_steps, 0)
        result["profile"] = {"dir": profile_dir, "steps": profile_steps, "step_seconds": profiled}
    return result


def _flop_counts(compiled: jax.stages.Compiled, lowered_count: concurrent.futures.Future | None,
                 num_devices: int) -> dict[str, Any]:
    """The step's flops: the CPU lowering's global count (``train.step_flops``) where it ran, else
    the compiled program's per-device count times the devices; both kept, and which one counts.

    The compiled count is reported beside the lowered one so a GPU run shows whether its backend's
    analysis counts the matmuls (it also counts the elementwise work fusion duplicates).
    """
    per_device = flops.cost_flops(compiled)
    counts: dict[str, Any] = {"compiled": None if per_device is None else per_device * num_devices}
    if lowered_count is not None:
        counts.update(flops_per_step=lowered_count.result(), source="lowered_cpu")
    elif counts["compiled"]:
        counts.update(flops_per_step=counts["compiled"], source="compiled")
    return counts


def _utilisation(flops_per_sec: float, dtype: str) -> dict[str, float | None]:
    """Achieved TFLOP/s, the devices' summed dense peak and their ratio (MFU); ``None`` where the peak is unknown."""
    peak = flops.peak_flops_per_device(jax.devices()[0], DTYPES[dtype])
    peak = None if peak is None else jax.device_count() * peak
    return {"achieved_tflops_per_sec": flops_per_sec / 1e12,
            "peak_tflops_per_sec": None if peak is None else peak / 1e12,
            "mfu": None if peak is None else flops_per_sec / peak}


def sample_benchmark(config: ml_collections.ConfigDict, *, num_steps: int, cfg_scale: float) -> dict[str, Any]:
    """Images/s, FLOPs per image and MFU of one guided DDPM run of ``num_steps`` over ``train.batch_size`` labels.

    The model is freshly initialised (the weights do not change the work) and replicated
    over the mesh ``config.mesh``; the labels are split over its batch axes. The run is
    done twice with the same shapes; the first compiles and is not timed. XLA counts a
    ``lax.scan`` body once, so the FLOPs are those of one guided model evaluation (the
    doubled batch) times ``num_steps``; the sampler's own elementwise update is left out.
    """
    mesh = sharding.create_mesh(config.mesh)
    model = train.build_model(config, rngs=nnx.Rngs(config.seed))
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, P())))
    diffusion = train.build_diffusion(config, str(num_steps))
    n = config.train.batch_size
    labels = jax.device_put(np.arange(n, dtype=np.int32) % config.model.num_classes, sharding.batch_sharding(mesh))

    def call():
        return engine.generate(model, diffusion, labels, jax.random.key(config.seed), cfg_scale=cfg_scale)

    graphdef, state = nnx.split(model)
    m = config.model

    def guided_eval(state, x, t, y):
        return nnx.merge(graphdef, state).forward_with_cfg(x, t, y, cfg_scale)

    x = jax.ShapeDtypeStruct((2 * n, m.input_size, m.input_size, m.in_channels), np.float32)
    t = y = jax.ShapeDtypeStruct((2 * n,), np.int32)
    flops_per_image = num_steps * flops.lowered_flops(guided_eval, state, x, t, y) / n
    (seconds,) = timed(call, 1, 1)
    return {"images": n, "sample_steps": num_steps, "cfg_scale": cfg_scale, "seconds": seconds,
            "images_per_sec": n / seconds, "sample_flops_per_image": flops_per_image,
            **_utilisation(flops_per_image * n / seconds, config.dtype)}


def jax_sample_benchmark(config: ml_collections.ConfigDict, *, num_steps: int, cfg_scale: float,
                         repeats: int, decode: bool = False) -> dict[str, Any]:
    """The same guided chain with ``python -m dit_jax.sample``'s engine over all devices, ``train.batch_size``
    images in all; with ``decode`` the program ends with the SD-VAE decode to pixels, as in sampling
    (``vae.AutoencoderKL`` randomly initialised: the speed does not depend on the weights).

    One program per block (``engine.create_image_sampler``, the whole chain one ``lax.scan``);
    the first call compiles and is not timed, then ``repeats`` timed calls of one batch.
    """
    from dit_jax import vae

    n, devices = config.train.batch_size, jax.device_count()
    if n % devices:
        raise ValueError(f"--batch {n} must be divisible by the {devices} devices")
    model = train.build_model(config, rngs=nnx.Rngs(config.seed))
    diffusion = train.build_diffusion(config, str(num_steps))
    decoder = vae.AutoencoderKL(vae.VAEConfig(), rngs=nnx.Rngs(0)) if decode else None
    image_sampler = engine.create_image_sampler(model, diffusion, cfg_scale=cfg_scale, per_device_batch=n // devices,
                                                mesh=sharding.create_mesh({"data": -1}), vae=decoder)
    labels = np.arange(n, dtype=np.int32) % config.model.num_classes
    seconds = timed(lambda: image_sampler.dispatch(config.seed, 0, labels), repeats, 1)
    return {"num_params": count_params(model), "device_kind": jax.devices()[0].device_kind, "num_devices": devices,
            "vae_decode": decode, "images": n, "seconds": seconds, "seconds_median": statistics.median(seconds),
            "images_per_sec": n / statistics.median(seconds)}


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
        row["jax"] = jax_sample_benchmark(row_config, num_steps=num_steps, cfg_scale=cfg_scale, repeats=repeats,
                                          decode=decode)
        for side in ("torch", "torch_tf32", "jax"):
            row[side]["hours_per_50k"] = _hours_per_50k(row[side])
        row["torch_over_jax_sample_time"] = {side: row["jax"]["images_per_sec"] / devices / row[side]["images_per_sec"]
                                             for side in ("torch", "torch_tf32")}
        result["rows"].append(row)
    result["load_average_after"] = os.getloadavg()
    return result


def format_sample_report(result: dict[str, Any]) -> str:
    """The ``sample_side_by_side`` result as readable lines: one per side and per-device batch."""
    lines = [f"guided sampling, {result['model']}, {result['latent_size']}x{result['latent_size']} latents, "
             f"{result['sample_steps']} DDPM steps, cfg {result['cfg_scale']}, {result['dtype']}, "
             f"{'with' if result['vae_decode'] else 'without'} the VAE decode, medians of {result['repeats']}; load "
             f"average {', '.join(f'{v:.1f}' for v in result['load_average'])} before, "
             f"{', '.join(f'{v:.1f}' for v in result['load_average_after'])} after"]
    for row in result["rows"]:
        j = row["jax"]
        for side in ("torch", "torch_tf32"):
            p = row[side]
            lines.append(f"per-device batch {row['per_device_batch']}: PyTorch ({p['precision']}, diffusers DiT, "
                         f"official eager loop, {p['device']}, {p['threads']} threads): {p['images_per_sec']:.2f} "
                         f"images/s, {p['hours_per_50k']:.2f} h per 50K; PyTorch / JAX sampling time "
                         f"{row['torch_over_jax_sample_time'][side]:.2f}")
        lines.append(f"per-device batch {row['per_device_batch']}: dit_jax ({j['num_devices']} x {j['device_kind']}): "
                     f"{j['images_per_sec']:.2f} images/s, {j['hours_per_50k']:.2f} h per 50K")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, *, steps: int, warmup: int, sample_steps: int, cfg_scale: float,
        with_torch: bool, torch_compile: bool | str = False, profile_dir: str | None = None) -> dict[str, Any]:
    """All benchmarks ``config`` asks for, as one JSON-ready dict.

    PyTorch runs first: JAX keeps the device memory it takes (by default it reserves 75% of
    a GPU at its first use), so PyTorch after it would run out of memory on a large model.
    """
    result: dict[str, Any] = {"model": config.model.name or "custom", "latent_size": config.model.input_size}
    if with_torch:
        result["torch_train"] = torch_reference.torch_train_benchmark(config, steps=steps, warmup=warmup, torch_compile=torch_compile)
    result["train"] = train_benchmark(config, steps=steps, warmup=warmup, profile_dir=profile_dir)
    if with_torch:
        result["torch_over_jax_step_time"] = {
            stat: result["torch_train"][f"step_seconds_{stat}"] / result["train"][f"step_seconds_{stat}"]
            for stat in ("median", "min")}
    if sample_steps:
        result["sample"] = sample_benchmark(config, num_steps=sample_steps, cfg_scale=cfg_scale)
    return result


def loader_benchmark(latents_dir: str, *, batch_size: int, batches: int, warmup: int) -> dict[str, Any]:
    """Latents/s (wall clock) and latents per CPU-second of the training input over ``latents_dir``.

    ``warmup`` batches first fill the prefetch buffer and are passed, so the timed window
    measures production, not the buffer.
    """
    if batch_size < 1 or batches < 1 or warmup < 0:
        raise ValueError(f"batch_size and batches must be >= 1 and warmup >= 0, got {batch_size}, {batches}, {warmup}")
    source = latents.LatentSource(latents_dir)
    batches_it = input_pipeline.make_train_iterator(source, batch_size=batch_size, seed=0)
    for _ in range(warmup):
        next(batches_it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        batch = next(batches_it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = batches * batch_size
    return {"latents_dir": latents_dir, "latent_shape": list(batch["image"].shape[1:]), "batch": batch_size,
            "batches": batches, "seconds": wall, "latents_per_sec": n / wall, "latents_per_cpu_sec": n / cpu}


def inception_benchmark(weights: str | None, *, image_size: int, batch_size: int, batches: int,
                        warmup: int) -> dict[str, Any]:
    """Images/s of the evaluator's feature extractor (TF1 resize to 299 + InceptionV3, float32 HIGHEST) on
    random uint8 ``image_size`` images, ``batch_size`` per call over all devices; ``weights`` None: random."""
    from dit_jax.fid import inception

    if image_size < 8 or batch_size < 1 or batches < 1 or warmup < 0:
        raise ValueError(f"image_size must be >= 8, batch_size and batches >= 1 and warmup >= 0, got {image_size}, "
                         f"{batch_size}, {batches}, {warmup}")
    model = inception.create_inception(inception.random_weights() if weights is None else weights)
    features = inception.create_feature_fn(model, batch_size=batch_size)
    images = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
    seconds = timed(lambda: features(images), batches, warmup)
    return {"weights": weights or "random", "image_size": image_size, "batch": batch_size,
            "devices": jax.device_count(), "platform": jax.devices()[0].platform, "device_kind":
            jax.devices()[0].device_kind, **summary(seconds, batch_size)}


def _gflop(flops_per_image: float | None) -> str:
    return "n/a" if flops_per_image is None else f"{flops_per_image / 1e9:.2f} GFLOP"


def _percent(fraction: float | None) -> str:
    return "unknown" if fraction is None else f"{100 * fraction:.1f}%"


def format_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_startup(startup: dict[str, float]) -> str:
    """``train_benchmark``'s start-up phases as one line."""
    phases = ", ".join(f"{name.removesuffix('_seconds').replace('_', ' ')} {value:.1f} s"
                       for name, value in startup.items() if name != "since_start_seconds")
    return f"start-up: first step finished {startup['since_start_seconds']:.1f} s after the start ({phases})"


def format_report(result: dict[str, Any]) -> str:
    """The ``run`` result as readable lines."""
    t = result["train"]
    lines = [
        f"{result['model']} on {t['num_devices']} x {t['device_kind']} (mesh {t['mesh']}), {t['dtype']}, "
        f"{result['latent_size']}x{result['latent_size']} latents, batch {t['batch']}, {t['num_params']:,} parameters",
        f"train step: {1e3 * t['step_seconds_median']:.1f} ms median, {1e3 * t['step_seconds_min']:.1f} ms min "
        f"over {t['steps']} steps; {t['images_per_sec']:.1f} images/s",
        f"train FLOPs/image: {t['train_flops_per_image'] / 1e9:.2f} GFLOP (XLA cost analysis, {t['flops_source']}, "
        f"multiply-add = 2; compiled: {_gflop(t['compiled_flops_per_image'])}); "
        f"{t['achieved_tflops_per_sec']:.3f} TFLOP/s; MFU {_percent(t['mfu'])}",
        f"peak device memory: {format_bytes(t['peak_memory_bytes'])}; remat {t['remat']}, attention {t['attention']}"
        f"{', scanned blocks' if t['scan_blocks'] else ''}",
        format_startup(t["startup"]) + f"; compilation cache {t['compilation_cache']['dir'] or 'off'}, "
        f"{'warm (the step was read from it)' if t['compilation_cache']['warm'] else 'cold'}",
    ]
    if "torch_train" in result:
        p, ratio = result["torch_train"], result["torch_over_jax_step_time"]
        lines.append(f"PyTorch (diffusers DiT, {p['num_params']:,} parameters, {p['device']}, {p['compute_dtype']} "
                     f"compute, {p['compile']}, {p['threads']} threads): {1e3 * p['step_seconds_median']:.1f} ms median, "
                     f"{1e3 * p['step_seconds_min']:.1f} ms min; {p['images_per_sec']:.1f} images/s")
        lines.append(f"PyTorch / JAX step time: {ratio['median']:.2f} (median), {ratio['min']:.2f} (min)")
    if "sample" in result:
        s = result["sample"]
        lines.append(f"sampling: {s['images']} images, {s['sample_steps']}-step guided DDPM (scale "
                     f"{s['cfg_scale']}): {s['seconds']:.2f} s, {s['images_per_sec']:.2f} images/s; "
                     f"{s['sample_flops_per_image'] / 1e9:.1f} GFLOP/image, {s['achieved_tflops_per_sec']:.3f} "
                     f"TFLOP/s; MFU {_percent(s['mfu'])}")
    return "\n".join(lines)


def make_config(model: str, *, image_size: int, batch: int, dtype: str, mesh: list[str],
                attention: str = "auto", remat: str = "none", scan_blocks: bool = False,
                **switches: str) -> ml_collections.ConfigDict:
    """The paper config of ``model`` with the benchmark's batch, dtype, attention, remat, block
    scanning, compute switches (``SWITCH_FIELDS``) and ``axis=size`` mesh entries."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    config = paper_config(model, image_size)
    config.train.batch_size = batch
    config.dtype = dtype
    config.attention = attention
    config.remat = remat
    config.model.scan_blocks = scan_blocks
    for field, value in switches.items():
        if field not in SWITCH_FIELDS:
            raise ValueError(f"unknown compute switch {field!r}; choose from {', '.join(SWITCH_FIELDS)}")
        config[field] = value
    for entry in mesh:
        axis, _, size = entry.partition("=")
        if axis not in config.mesh or not size.lstrip("-").isdigit():
            raise ValueError(f"mesh entries are axis=size with axis one of {list(config.mesh)}, got {entry!r}")
        config.mesh[axis] = int(size)
    return config


def _define_flags() -> None:
    """The command line. Defined only when run as a program: ``model_stats`` has a ``--json``
    flag too, and both modules are imported side by side (tests, notebooks)."""
    flags.DEFINE_string("model", "DiT-XL/2", "Paper model name (models.MODELS).")
    flags.DEFINE_integer("image_size", 256, "Image size; the model sees image_size / 8 latents.")
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype (parameters stay float32).")
    flags.DEFINE_enum("attention", "auto", list(ATTENTION_IMPLEMENTATIONS),
                      "jax.nn.dot_product_attention kernel (cudnn: NVIDIA GPUs, bfloat16; auto: cudnn where it works).")
    for field, modes in SWITCH_FIELDS.items():
        flags.DEFINE_enum(field, None, list(modes), "Compute switch (docs/compute_switches.md); default: the config's.")
    flags.DEFINE_enum("remat", "none", list(REMAT_MODES), "Recompute block activations in the backward pass.")
    flags.DEFINE_bool("scan_blocks", False, "Stack the blocks' parameters and run them as one lax.scan.")
    flags.DEFINE_list("mesh", [], "Mesh axis sizes as axis=size (data, fsdp, tensor; one may be -1); "
                      "default: all devices on data.")
    flags.DEFINE_integer("batch", 32, "Global batch: training examples per step, images per sampling run.")
    flags.DEFINE_integer("steps", 20, "Timed training steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed training steps first (the first one compiles).")
    flags.DEFINE_integer("sample_steps", 250, "DDPM steps of the timed guided sampling run; 0 skips it.")
    flags.DEFINE_float("cfg_scale", 4.0, "Guidance scale of the sampling run.")
    flags.DEFINE_bool("torch", False, "Also time the same training step in PyTorch (diffusers DiT).")
    flags.DEFINE_bool("torch_compile", False, "With --torch: torch.compile the PyTorch model (inductor).")
    flags.DEFINE_string("profile_dir", None, "Also trace 3 train steps with jax.profiler into this folder.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")
    compilation_cache.define_flag()
    flags.DEFINE_bool("sample_torch", False, "Instead: guided sampling of one --batch (--sample_steps, --cfg_scale), "
                      "PyTorch (the official eager loop on diffusers' DiT) then ours, --sample_repeats timed runs each.")
    flags.DEFINE_integer("sample_repeats", 3, "Timed sampling runs per side with --sample_torch (the median counts).")
    flags.DEFINE_list("sample_batches", [], "With --sample_torch: per-device batches, one row each (e.g. 64,128,256); "
                      "default --batch over the devices.")
    flags.DEFINE_bool("inception", False, "Instead: time the evaluator's feature extractor (dit_jax.evaluate's "
                      "resize + InceptionV3) on --batch random --image_size images, --steps batches after --warmup.")
    flags.DEFINE_string("inception_weights", None, "With --inception: the FID InceptionV3 weights (default: random "
                        "tensors of its shapes; the speed does not depend on them).")
    flags.DEFINE_string("loader_dir", None, "Instead: time the training input over this extract_latents folder "
                        "(--batch latents a batch, --steps batches after --warmup).")


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    compilation_cache.enable(f.compilation_cache)
    if f.sample_steps < 0:
        raise app.UsageError(f"--sample_steps must be >= 0, got {f.sample_steps}")
    if f.inception:
        result = inception_benchmark(f.inception_weights, image_size=f.image_size, batch_size=f.batch,
                                     batches=f.steps, warmup=f.warmup)
        print(json.dumps(result, indent=1) if f.json else
              f"Inception features: {result['images_per_sec']:.2f} images/s ({f.image_size}x{f.image_size} uint8 -> "
              f"resize to 299 + InceptionV3), batches of {f.batch} on {result['devices']} {result['platform']} "
              f"device(s), {result['weights']} weights; median of {f.steps} batches")
        return
    if f.loader_dir:
        result = loader_benchmark(f.loader_dir, batch_size=f.batch, batches=f.steps, warmup=f.warmup)
        print(json.dumps(result, indent=1) if f.json else
              f"loader: {result['latents_per_sec']:,.0f} latents/s ({result['latents_per_cpu_sec']:,.0f} per "
              f"CPU-second), batches of {f.batch} x {result['latent_shape']} from {f.loader_dir}")
        return
    try:
        config = make_config(f.model, image_size=f.image_size, batch=f.batch, dtype=f.dtype, mesh=f.mesh,
                             attention=f.attention, remat=f.remat, scan_blocks=f.scan_blocks,
                             **{field: f[field].value for field in SWITCH_FIELDS if f[field].value is not None})
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if f.sample_torch:
        if f.sample_steps < 1:
            raise app.UsageError("--sample_torch needs --sample_steps >= 1")
        if not all(b.isdigit() for b in f.sample_batches):
            raise app.UsageError(f"--sample_batches are per-device batch sizes, got {f.sample_batches}")
        result = sample_side_by_side(config, num_steps=f.sample_steps, cfg_scale=f.cfg_scale, repeats=f.sample_repeats,
                                     per_device_batches=[int(b) for b in f.sample_batches])
        print(json.dumps(result, indent=1) if f.json else format_sample_report(result))
        return
    result = run(config, steps=f.steps, warmup=f.warmup, sample_steps=f.sample_steps, cfg_scale=f.cfg_scale,
                 with_torch=f.torch, torch_compile=f.torch_compile, profile_dir=f.profile_dir)
    print(json.dumps(result, indent=1) if f.json else format_report(result))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
