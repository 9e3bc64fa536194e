"""Throughput of the training step and of guided sampling, with FLOPs and MFU; optionally vs PyTorch.

``python -m dit_jax.benchmark --model DiT-XL/2 --batch 32 --steps 20 --dtype bfloat16`` times
the project's real jitted train step (``train.make_train_step``: hybrid loss, label dropout,
AdamW, EMA) on a fixed on-device batch of random latents, so no input pipeline is measured,
with the state and batch laid out on a device mesh (``sharding.py``; ``--mesh``), then a
guided DDPM run (``engine.generate``, 250 steps unless ``--sample_steps``). Each timed call
ends with ``block_until_ready``; warm-up calls (compilation included) are not timed.

Train FLOPs come from XLA's cost analysis of the lowered, global step (``perf/measure.py``); their
ratio to the devices' dense peak for ``--dtype`` is the MFU, "unknown" where the device is not in
``flops.peak_flops_per_device``'s table.

``--torch`` also times the same model and batch in PyTorch on the CPU or CUDA device:
diffusers' ``DiTTransformer2DModel`` (see ``perf/torch_reference.py`` for what each side computes).

``--loader_dir DIR`` instead measures the training input: the latents/s that the grain
pipeline over an ``extract_latents`` folder delivers on this host (shuffled reads, a fresh
posterior sample and a random flip per latent, batched, prefetched).

``--inception`` instead measures the evaluator's feature extractor (``dit_jax.evaluate``'s TF1
resize to 299 and the FID InceptionV3 in float32 ``precision=HIGHEST``): images/s on random
uint8 ``--image_size`` images (random weights unless ``--inception_weights``).
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before jax's import: start-up figures count the imports too

import json

from absl import app, flags

from dit_jax import compilation_cache, console
from dit_jax.model_compute import ATTENTION_IMPLEMENTATIONS, DTYPES, REMAT_MODES, SWITCH_FIELDS
from dit_jax.perf import measure, report, side_by_side


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
        result = measure.inception_benchmark(f.inception_weights, image_size=f.image_size, batch_size=f.batch,
                                             batches=f.steps, warmup=f.warmup)
        print(json.dumps(result, indent=1) if f.json else
              f"Inception features: {result['images_per_sec']:.2f} images/s ({f.image_size}x{f.image_size} uint8 -> "
              f"resize to 299 + InceptionV3), batches of {f.batch} on {result['devices']} {result['platform']} "
              f"device(s), {result['weights']} weights; median of {f.steps} batches")
        return
    if f.loader_dir:
        result = measure.loader_benchmark(f.loader_dir, batch_size=f.batch, batches=f.steps, warmup=f.warmup)
        print(json.dumps(result, indent=1) if f.json else
              f"loader: {result['latents_per_sec']:,.0f} latents/s ({result['latents_per_cpu_sec']:,.0f} per "
              f"CPU-second), batches of {f.batch} x {result['latent_shape']} from {f.loader_dir}")
        return
    try:
        config = measure.make_config(f.model, image_size=f.image_size, batch=f.batch, dtype=f.dtype, mesh=f.mesh,
                                     attention=f.attention, remat=f.remat, scan_blocks=f.scan_blocks,
                                     **{field: f[field].value for field in SWITCH_FIELDS if f[field].value is not None})
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if f.sample_torch:
        if f.sample_steps < 1:
            raise app.UsageError("--sample_torch needs --sample_steps >= 1")
        if not all(b.isdigit() for b in f.sample_batches):
            raise app.UsageError(f"--sample_batches are per-device batch sizes, got {f.sample_batches}")
        result = side_by_side.sample_side_by_side(config, num_steps=f.sample_steps, cfg_scale=f.cfg_scale,
                                                  repeats=f.sample_repeats,
                                                  per_device_batches=[int(b) for b in f.sample_batches])
        print(json.dumps(result, indent=1) if f.json else report.format_sample_report(result))
        return
    result = side_by_side.run(config, steps=f.steps, warmup=f.warmup, sample_steps=f.sample_steps,
                              cfg_scale=f.cfg_scale, with_torch=f.torch, torch_compile=f.torch_compile,
                              profile_dir=f.profile_dir, started=_STARTED)
    print(json.dumps(result, indent=1) if f.json else report.format_report(result))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
