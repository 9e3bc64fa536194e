"""XLA flop counts of lowered, compiled and sharded programs; the accelerator peak table."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.flops import compiled_flops, peak_flops_per_device, xla_gflops

M, K, N = 64, 96, 128
MATMUL_FLOPS = 2 * M * K * N  # XLA's convention: a multiply-add is two flops


def _matmul(x, w):
    return x @ w


def _lowered():
    return jax.jit(_matmul).lower(jnp.ones((M, K)), jnp.ones((K, N)))


def test_lowered_and_compiled_count_the_matmul():
    lowered = _lowered()
    assert compiled_flops(lowered, 1) == MATMUL_FLOPS
    assert compiled_flops(lowered.compile(), 1) == MATMUL_FLOPS


def test_lowered_program_is_global_so_devices_are_not_applied():
    assert compiled_flops(_lowered(), 8) == MATMUL_FLOPS


def test_compiled_count_scales_with_devices():
    compiled = _lowered().compile()
    assert compiled_flops(compiled, 4) == 4 * compiled_flops(compiled, 1)


def test_xla_gflops_uses_the_papers_convention():
    assert xla_gflops(_matmul, jnp.ones((M, K)), jnp.ones((K, N))) == MATMUL_FLOPS / 2 / 1e9


def test_bad_arguments_are_reported():
    with pytest.raises(TypeError, match="Compiled or Lowered"):
        compiled_flops(_matmul, 1)
    with pytest.raises(ValueError, match="num_devices"):
        compiled_flops(_lowered(), 0)


def test_sharded_program_counts_all_devices():
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))  # the 8 CPU devices that conftest.py simulates
    x = jax.device_put(jnp.ones((M, K)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((K, N)), NamedSharding(mesh, P()))
    compiled = jax.jit(_matmul).lower(x, w).compile()
    assert compiled_flops(compiled, 1) == MATMUL_FLOPS / 8  # each device multiplies its eighth of the rows
    assert compiled_flops(compiled, 8) == MATMUL_FLOPS


@pytest.mark.parametrize("kind, dtype, peak", [
    ("TPU v3", jnp.bfloat16, 61.5e12),  # two jax devices per 123-TFLOPS chip
    ("TPU v4", jnp.bfloat16, 275e12),
    ("TPU v5 lite", jnp.bfloat16, 197e12),
    ("TPU v5p", jnp.bfloat16, 459e12),
    ("TPU v5", jnp.bfloat16, 459e12),
    ("TPU v6 lite", jnp.bfloat16, 918e12),
    ("NVIDIA A100-SXM4-80GB", jnp.bfloat16, 312e12),
    ("NVIDIA A100-SXM4-80GB", jnp.float32, 156e12),
    ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989.5e12),
    ("NVIDIA H100 80GB HBM3", jnp.float16, 989.5e12),
    ("NVIDIA H100 PCIe", jnp.bfloat16, 756.5e12),
    ("NVIDIA H200", jnp.bfloat16, 989.5e12),
])
def test_peak_table(kind, dtype, peak):
    assert peak_flops_per_device(SimpleNamespace(device_kind=kind), dtype) == peak


@pytest.mark.parametrize("kind, dtype", [
    ("cpu", jnp.bfloat16),
    ("TPU v4 lite", jnp.bfloat16),  # a different chip, not a v4
    ("TPU v4", jnp.float32),  # no published float32 figure
    ("NVIDIA GeForce RTX 4090", jnp.bfloat16),
])
def test_unknown_peaks_are_none(kind, dtype):
    assert peak_flops_per_device(SimpleNamespace(device_kind=kind), dtype) is None


def test_this_cpu_has_no_peak():
    assert peak_flops_per_device(jax.devices()[0]) is None
