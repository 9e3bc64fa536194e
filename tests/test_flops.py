"""XLA flop counts of lowered, compiled and sharded programs; the accelerator peak table."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.flops import lowered_flops, peak_flops_per_device, xla_gflops

M, K, N = 64, 96, 128
MATMUL_FLOPS = 2 * M * K * N  # XLA's convention: a multiply-add is two flops


def _matmul(x, w):
    return x @ w


def test_lowered_flops_count_the_global_program_from_shapes_alone():
    """Lowered for the host CPU from shapes (keys included): the same count whatever the arguments hold."""
    def keyed_matmul(x, w, key):
        return x @ w + jax.random.normal(key, (M, N))

    x, w = jnp.ones((M, K)), jnp.ones((K, N))
    plain = lowered_flops(_matmul, x, w)
    assert plain == MATMUL_FLOPS
    assert lowered_flops(jax.jit(_matmul), 2 * x, w) == plain
    assert lowered_flops(keyed_matmul, x, w, jax.random.key(0)) > plain  # + the sampling and the add


def test_xla_gflops_uses_the_papers_convention():
    assert xla_gflops(_matmul, jnp.ones((M, K)), jnp.ones((K, N))) == MATMUL_FLOPS / 2 / 1e9


def test_sharded_program_counts_all_devices():
    """The count is the global program's: a step sharded over 8 devices counts all their work."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))  # the 8 CPU devices that conftest.py simulates
    x = jax.device_put(jnp.ones((M, K)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((K, N)), NamedSharding(mesh, P()))
    assert lowered_flops(_matmul, x, w) == MATMUL_FLOPS
    per_device = jax.jit(_matmul).lower(x, w).compile().cost_analysis()["flops"]
    assert per_device == MATMUL_FLOPS / 8  # what a compiled SPMD program reports: one device's share


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
