"""Timings of the project's own programs: the training step, guided sampling, the training input and
the evaluator's features, with FLOPs and MFU; the benchmark's config.

``train_benchmark`` times the real jitted train step (``train.make_train_step``: hybrid loss, label
dropout, AdamW, EMA) on a fixed on-device batch of random latents, so no input pipeline is
measured, with the state and batch laid out on a device mesh (``sharding.py``). Each timed call
ends with ``block_until_ready``; warm-up calls (compilation included) are not timed.

Train FLOPs come from XLA's cost analysis of the step (see ``flops.py``: a multiply-add is
two flops; everything the step computes counts, optimiser and EMA included). They are
counted on the lowered, global program, before XLA's fusion duplicates cheap elementwise
work into several kernels (the compiled per-device count times the devices is a few %
higher on tiny models): these are the model's flops, so the ratio to the devices' dense
peak for the dtype is the MFU, None where the device is not in ``flops.peak_flops_per_device``'s table.
Used by ``python -m dit_jax.benchmark`` and by the sweep's rows (``runner``).
"""

from __future__ import annotations

import time

IMPORTED = time.perf_counter()  # before jax's import: start-up figures count the imports too

import concurrent.futures
import os
import statistics
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import compilation_cache, flops, input_pipeline, latents, sharding, train, train_state
from dit_jax.model_compute import DTYPES, SWITCH_FIELDS
from dit_jax.models import MODELS, count_params
from dit_jax.perf.timing import summary, timed
from dit_jax.perf.trace import PROFILE_HLO
from dit_jax.recipes import paper_config
from dit_jax.sampling import engine


def random_batch(config: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
    """A batch of standard-normal latents and uniform labels, shaped as ``config`` says."""
    m, n = config.model, config.train.batch_size
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, m.input_size, m.input_size, m.in_channels), np.float32),
            "label": rng.integers(0, m.num_classes, n, dtype=np.int32)}


def peak_memory_bytes() -> int | None:
    """The most device memory any local device has held (its allocator's peak), or None where the
    backend keeps no statistics (CPUs)."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def train_benchmark(config: ml_collections.ConfigDict, *, steps: int, warmup: int, count_flops: bool = True,
                    profile_dir: str | None = None, profile_steps: int = 3,
                    started: float = IMPORTED) -> dict[str, Any]:
    """Step time, images/s, train FLOPs per image and MFU of ``train.make_train_step`` on ``config``.

    The state and batch are placed on the mesh ``config.mesh`` over all devices. ``startup``
    splits the time to the first finished step: creating the state, tracing/lowering the step,
    compiling it, the first call; the FLOP count (a CPU lowering, skipped with ``count_flops=False``)
    runs in a thread meanwhile, and ``flops_count`` is only what it took beyond them (waited for
    after the first step, before the timed ones, so it is not part of ``since_start_seconds``).
    The MFU uses that count (``flops_source`` "lowered_cpu"), else the compiled program's
    ("compiled"), which is reported beside it (``compiled_flops_per_image``). ``since_start_seconds`` is
    measured from ``started`` (a ``time.perf_counter()``; by default this module's import, before
    jax's; ``python -m dit_jax.benchmark`` passes the start of the command). With ``profile_dir``,
    ``profile_steps`` more steps are traced there (``jax.profiler``, with a Perfetto JSON trace)
    beside the compiled program's text (``trace.PROFILE_HLO``), for ``time_split``.
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

    graphdef, fixed, state = train_state.create_train_state(config, mesh)  # as the trainer: sharded from the start
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
        startup["since_start_seconds"] = clock - started
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
    model = train_state.build_model(config, rngs=nnx.Rngs(config.seed))
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
    model = train_state.build_model(config, rngs=nnx.Rngs(config.seed))
    diffusion = train.build_diffusion(config, str(num_steps))
    decoder = vae.AutoencoderKL(vae.VAEConfig(), rngs=nnx.Rngs(0)) if decode else None
    image_sampler = engine.create_image_sampler(model, diffusion, cfg_scale=cfg_scale, per_device_batch=n // devices,
                                                mesh=sharding.create_mesh({"data": -1}), vae=decoder)
    labels = np.arange(n, dtype=np.int32) % config.model.num_classes
    seconds = timed(lambda: image_sampler.dispatch(config.seed, 0, labels), repeats, 1)
    return {"num_params": count_params(model), "device_kind": jax.devices()[0].device_kind, "num_devices": devices,
            "vae_decode": decode, "images": n, "seconds": seconds, "seconds_median": statistics.median(seconds),
            "images_per_sec": n / statistics.median(seconds)}



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

