"""The benchmark's figures on a tiny DiT: structure, positivity, FLOPs against the lowered count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from flax import nnx

from dit_jax import benchmark, train
from dit_jax.flops import xla_gflops
from dit_jax.models import count_params
from dit_jax.recipes import base_config

BATCH = 8  # divisible by up to 8 (simulated) devices


def tiny_config():
    c = base_config()
    c.model.name = ""
    c.model.update(patch_size=2, hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=10)
    c.train.batch_size = BATCH
    return c


def lowered_train_flops_per_image(config) -> float:
    """The count model_stats' way (``xla_gflops`` of the lowered program), of the benchmark's step."""
    graphdef, fixed, state = train.create_train_state(config)
    step = train.make_train_step(config, graphdef, fixed, train.build_diffusion(config))
    return 2e9 * xla_gflops(step, state, benchmark.random_batch(config, 0)) / config.train.batch_size


@pytest.fixture(scope="module")
def result():
    return benchmark.run(tiny_config(), steps=2, warmup=1, sample_steps=2, cfg_scale=4.0, with_torch=True)


def test_train_figures(result):
    t = result["train"]
    config = tiny_config()
    assert t["num_params"] == count_params(train.build_model(config, rngs=nnx.Rngs(0)))
    assert t["num_devices"] == jax.device_count() and t["batch"] == BATCH and t["steps"] == 2
    assert t["mesh"] == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert 0 < t["step_seconds_min"] <= t["step_seconds_median"]
    assert t["step_seconds_min"] <= t["step_seconds_mean"]
    assert t["images_per_sec"] == pytest.approx(BATCH / t["step_seconds_median"])
    assert t["achieved_tflops_per_sec"] == pytest.approx(
        t["train_flops_per_image"] * BATCH / t["step_seconds_median"] / 1e12)
    assert t["mfu"] is None and t["peak_tflops_per_sec"] is None  # no peak is known for a CPU


def test_train_flops_equal_the_lowered_count(result):
    expected = lowered_train_flops_per_image(tiny_config())
    assert result["train"]["train_flops_per_image"] == pytest.approx(expected, rel=1e-6)


def test_torch_figures(result):
    p = result["torch_train"]
    assert p["device"] == "cpu" and p["threads"] == os.cpu_count() and p["batch"] == BATCH
    assert p["num_params"] > 0
    assert 0 < p["step_seconds_min"] <= p["step_seconds_median"]
    ratio = result["torch_over_jax_step_time"]
    assert ratio["median"] == pytest.approx(p["step_seconds_median"] / result["train"]["step_seconds_median"])
    assert ratio["min"] == pytest.approx(p["step_seconds_min"] / result["train"]["step_seconds_min"])


def test_sample_figures(result):
    s = result["sample"]
    assert s["images"] == BATCH and s["sample_steps"] == 2 and s["seconds"] > 0
    assert s["images_per_sec"] == pytest.approx(BATCH / s["seconds"])


def test_report_and_json(result):
    report = benchmark.format_report(result)
    assert "MFU unknown" in report and "PyTorch / JAX step time" in report and "2-step guided DDPM" in report
    assert json.loads(json.dumps(result)) == result


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="steps and warmup"):
        benchmark.train_benchmark(tiny_config(), steps=0, warmup=1)
    config = tiny_config()
    config.model.block_type = "in_context"
    with pytest.raises(ValueError, match="adaLN-Zero"):
        benchmark.torch_train_benchmark(config, steps=1, warmup=1)


def test_cli_rejects_bad_flags():
    for args, expected in ((["--model", "DiT-M/3"], "DiT-M/3"), (["--mesh", "rows=2"], "rows=2")):
        out = subprocess.run([sys.executable, "-m", "dit_jax.benchmark", *args], capture_output=True, text=True)
        assert out.returncode != 0 and expected in out.stderr


def test_sharded_run_counts_the_global_program():
    # 8 simulated devices need XLA_FLAGS before jax starts: run in a fresh interpreter.
    script = textwrap.dedent("""
        import json
        from dit_jax import benchmark
        from tests.test_benchmark import lowered_train_flops_per_image, tiny_config
        config = tiny_config()
        config.mesh.update(data=4, fsdp=2)
        t = benchmark.train_benchmark(config, steps=1, warmup=1)
        print(json.dumps(t))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    sharded = json.loads(out.stdout.strip().splitlines()[-1])
    assert sharded["num_devices"] == 8 and sharded["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharded["step_seconds_median"] > 0
    # The lowered program is the global one: sharding it changes where the work runs, not the count.
    expected = lowered_train_flops_per_image(tiny_config())
    assert sharded["train_flops_per_image"] == pytest.approx(expected, rel=1e-6)
