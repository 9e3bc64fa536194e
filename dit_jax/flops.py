"""FLOP counting from XLA's cost analysis, and the peak FLOP rates of accelerators, for MFU.

Two conventions meet here. XLA (and every accelerator's peak figure) counts a multiply-add
as two flops; the DiT paper's "Gflops" count it as one. ``lowered_flops`` and
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


def cost_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
    """XLA's flop count of ``stage``, or None where the backend does not analyse that stage."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one entry per program on some older backends
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def lowered_flops(fn: Callable[..., Any], *args: Any) -> float:
    """Flops (a multiply-add counts as two) of ``fn(*args)`` as XLA counts the whole program.

    The program is lowered for the host CPU from the arguments' shapes alone, never compiled:
    the pre-optimisation count is the global, unpartitioned program's (a sharded step's total
    over all its devices), costs no compile time, and works on GPUs too, whose XLA backend analyses
    only compiled per-device programs (whether that count includes the matmuls it hands to cuBLAS
    is not yet checked on a GPU: the benchmark reports both counts).
    """
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]):
        flops = cost_flops(jax.jit(fn).lower(*abstract))
    if flops is None:
        raise ValueError("XLA's cost analysis of this program has no flop count")
    return flops


def xla_gflops(fn: Callable[..., Any], *args: Any) -> float:
    """Gflops of ``fn(*args)`` in the paper's convention: one multiply-add counts as one flop."""
    return lowered_flops(fn, *args) / 2e9
