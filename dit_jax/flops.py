"""FLOP counting from XLA's cost analysis, and the peak FLOP rates of accelerators, for MFU.

Two conventions meet here. XLA (and every accelerator's peak figure) counts a multiply-add
as two flops; the DiT paper's "Gflops" count it as one. ``compiled_flops`` and
``peak_flops_per_device`` use XLA's convention, so their ratio is the model FLOPs
utilisation; ``xla_gflops`` uses the paper's, for comparison with its Table 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no structured sparsity) peak flops per jax device, from the vendors' spec sheets:
# Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v2 ... /v6e) and NVIDIA's
# A100, H100 and H200 datasheets. TPU v2 and v3 chips hold two TensorCores that jax exposes
# as two devices, so their per-chip figures (45 and 123 TFLOPS) are halved; from v4 on one
# device is one chip. On TPUs a float32 matmul at default precision runs as bfloat16 passes
# on the MXU, so no float32 figure is given for them. On NVIDIA GPUs float32 matmuls at
# jax's default precision run on the tensor cores as TF32, whose dense peak is given. NVIDIA
# quotes H100/H200 figures with 2:4 sparsity; the dense figures here are half of those.
_TPU_PEAKS: dict[str, dict[str, float]] = {  # exact jax ``device_kind`` strings
    "TPU v2": {"bfloat16": 22.5e12},
    "TPU v3": {"bfloat16": 61.5e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},  # v5e
    "TPU v5": {"bfloat16": 459e12},  # v5p, as older runtimes name it
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},  # v6e (Trillium)
}
_GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (  # ``device_kind`` prefixes, most specific first
    ("NVIDIA H100 PCIe", {"bfloat16": 756.5e12, "float32": 378e12}),
    ("NVIDIA H100 NVL", {"bfloat16": 835.5e12, "float32": 417.5e12}),
    ("NVIDIA H100", {"bfloat16": 989.5e12, "float32": 494.5e12}),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("NVIDIA H200", {"bfloat16": 989.5e12, "float32": 494.5e12}),
    ("NVIDIA A100", {"bfloat16": 312e12, "float32": 156e12}),  # SXM4 and PCIe, 40 and 80 GB
)


def peak_flops_per_device(device: jax.Device, dtype: Any = jnp.bfloat16) -> float | None:
    """Dense peak flops/s of one jax device for matmuls in ``dtype``; ``None`` if not known.

    float16 counts as bfloat16 (the same tensor-core rate); unknown devices (CPUs, other
    accelerators) and dtypes without a published figure give ``None``.
    """
    name = np.dtype(dtype).name
    name = "bfloat16" if name == "float16" else name
    kind = device.device_kind
    if kind in _TPU_PEAKS:
        return _TPU_PEAKS[kind].get(name)
    for prefix, peaks in _GPU_PEAKS:
        if kind.startswith(prefix):
            return peaks.get(name)
    return None


def _cost_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float:
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one entry per program on some older backends
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        raise ValueError(f"XLA's cost analysis of this program has no flop count (got {analysis!r}); "
                         "this backend does not report one")
    return float(analysis["flops"])


def compiled_flops(compiled: jax.stages.Compiled | jax.stages.Lowered, num_devices: int) -> float:
    """Flops of one run of a program over all devices (a multiply-add counts as two).

    A compiled SPMD program is the per-device program, so its count is multiplied by
    ``num_devices`` (the devices it runs on). A lowered program is still the global,
    unpartitioned one: its count is already the total and ``num_devices`` is not applied.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if isinstance(compiled, jax.stages.Lowered):
        return _cost_flops(compiled)
    if isinstance(compiled, jax.stages.Compiled):
        return _cost_flops(compiled) * num_devices
    raise TypeError(f"expected a jax Compiled or Lowered program (jax.jit(f).lower(...)[.compile()]), "
                    f"got {type(compiled).__name__}")


def xla_gflops(fn: Callable[..., Any], *args: Any) -> float:
    """Gflops of ``fn(*args)`` in the paper's convention: one multiply-add counts as one flop.

    The program is lowered, not compiled: the pre-optimisation count is backend-independent
    and costs no compile time.
    """
    return compiled_flops(jax.jit(fn).lower(*args), 1) / 2e9
