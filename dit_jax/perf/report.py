"""The benchmark's results as readable lines (``side_by_side.run``'s and ``sample_side_by_side``'s)."""

from __future__ import annotations

from typing import Any


def _gflop(flops_per_image: float | None) -> str:
    return "n/a" if flops_per_image is None else f"{flops_per_image / 1e9:.2f} GFLOP"


def _percent(fraction: float | None) -> str:
    return "unknown" if fraction is None else f"{100 * fraction:.1f}%"


def format_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_startup(startup: dict[str, float]) -> str:
    """``measure.train_benchmark``'s start-up phases as one line."""
    phases = ", ".join(f"{name.removesuffix('_seconds').replace('_', ' ')} {value:.1f} s"
                       for name, value in startup.items() if name != "since_start_seconds")
    return f"start-up: first step finished {startup['since_start_seconds']:.1f} s after the start ({phases})"


def format_report(result: dict[str, Any]) -> str:
    """``side_by_side.run``'s result as readable lines."""
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
