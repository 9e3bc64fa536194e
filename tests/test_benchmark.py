"""The benchmark's figures on a tiny DiT: structure, positivity, FLOPs against the lowered count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import train, train_state
from dit_jax.fid import inception
from dit_jax.flops import xla_gflops
from dit_jax.models import count_params
from dit_jax.perf import measure, report, side_by_side, torch_reference
from tests.run_files import write_latents
from tests.tiny_models import BENCHMARK_BATCH as BATCH, BENCHMARK_MESH as MESH, tiny_benchmark_config as tiny_config

ROOT = Path(__file__).resolve().parents[1]



def lowered_train_flops_per_image(config) -> float:
    """The count model_stats' way (``xla_gflops`` of the lowered program), of the benchmark's step."""
    graphdef, fixed, state = train_state.create_train_state(config)
    step = train.make_train_step(config, graphdef, fixed, train.build_diffusion(config))
    return 2e9 * xla_gflops(step, state, measure.random_batch(config, 0)) / config.train.batch_size


@pytest.fixture(scope="module")
def result():
    return side_by_side.run(tiny_config(), steps=2, warmup=1, sample_steps=2, cfg_scale=4.0, with_torch=True)


def test_train_figures(result):
    t = result["train"]
    config = tiny_config()
    assert t["num_params"] == count_params(train_state.build_model(config, rngs=nnx.Rngs(0)))
    assert t["num_devices"] == jax.device_count() == 8 and t["batch"] == BATCH and t["steps"] == 2
    assert t["mesh"] == MESH
    assert 0 < t["step_seconds_min"] <= t["step_seconds_median"]
    assert t["step_seconds_min"] <= t["step_seconds_mean"]
    assert t["images_per_sec"] == pytest.approx(BATCH / t["step_seconds_median"])
    assert t["achieved_tflops_per_sec"] == pytest.approx(
        t["train_flops_per_image"] * BATCH / t["step_seconds_median"] / 1e12)
    assert t["mfu"] is None and t["peak_tflops_per_sec"] is None  # no peak is known for a CPU
    assert t["peak_memory_bytes"] is None  # XLA:CPU keeps no allocator statistics
    phases = ["init_seconds", "trace_seconds", "compile_seconds", "first_step_seconds"]
    assert list(t["startup"]) == [*phases, "since_start_seconds", "flops_count_seconds"]
    assert all(t["startup"][p] > 0 for p in phases) and t["startup"]["flops_count_seconds"] >= 0
    # The MFU's count is the CPU lowering's (run during the compile); the compiled program's is beside it.
    assert t["flops_source"] == "lowered_cpu"
    assert t["compilation_cache"] == {"dir": None, "warm": False}  # not enabled in the tests' process
    assert 0.9 < t["compiled_flops_per_image"] / t["train_flops_per_image"] < 1.5
    assert t["startup"]["since_start_seconds"] > sum(t["startup"][p] for p in phases)


def test_train_flops_equal_the_lowered_count(result):
    # The lowered program is the global one: sharding it changes where the work runs, not the count.
    expected = lowered_train_flops_per_image(tiny_config())
    assert result["train"]["train_flops_per_image"] == pytest.approx(expected, rel=1e-6)


def test_torch_figures(result):
    p = result["torch_train"]
    assert p["device"] == "cpu" and p["threads"] == os.cpu_count() and p["batch"] == BATCH
    assert p["compute_dtype"] == "float32"
    assert p["num_params"] > 0
    assert 0 < p["step_seconds_min"] <= p["step_seconds_median"]
    ratio = result["torch_over_jax_step_time"]
    assert ratio["median"] == pytest.approx(p["step_seconds_median"] / result["train"]["step_seconds_median"])
    assert ratio["min"] == pytest.approx(p["step_seconds_min"] / result["train"]["step_seconds_min"])


def test_sample_figures(result):
    s = result["sample"]
    assert s["images"] == BATCH and s["sample_steps"] == 2 and s["seconds"] > 0
    assert s["images_per_sec"] == pytest.approx(BATCH / s["seconds"])
    # Two steps, each one model evaluation of the doubled (conditional + null) batch; guidance adds a little.
    model = train_state.build_model(tiny_config(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x, t = jnp.zeros((2 * BATCH, 8, 8, 4)), jnp.zeros((2 * BATCH,), jnp.int32)
    forward = 2e9 * xla_gflops(lambda state, x, t: nnx.merge(graphdef, state)(x, t, t), state, x, t)
    assert s["sample_flops_per_image"] == pytest.approx(2 * forward / BATCH, rel=0.01)
    assert s["sample_flops_per_image"] > 2 * forward / BATCH
    assert s["achieved_tflops_per_sec"] == pytest.approx(s["sample_flops_per_image"] * s["images_per_sec"] / 1e12)
    assert s["mfu"] is None


def test_torch_bfloat16_runs_the_model_under_autocast():
    config = tiny_config()
    config.dtype = "bfloat16"
    p = torch_reference.torch_train_benchmark(config, steps=1, warmup=1)
    assert p["compute_dtype"] == "bfloat16" and p["step_seconds_median"] > 0


def test_torch_compile_option_compiles_the_model_it_runs(monkeypatch):
    """``torch_compile`` wraps the DiT in torch.compile (here the quick ``eager`` backend: the wiring)."""
    import torch

    calls, real_compile = [], torch.compile

    def recording(model, **kwargs):
        calls.append((type(model).__name__, kwargs))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording)
    p = torch_reference.torch_train_benchmark(tiny_config(), steps=1, warmup=1, torch_compile="eager")
    assert calls == [("DiTTransformer2DModel", {"backend": "eager"})]
    assert p["compile"] == "torch.compile(eager)" and p["step_seconds_median"] > 0
    assert torch_reference.torch_train_benchmark(tiny_config(), steps=1, warmup=1)["compile"] == "eager"


@pytest.mark.slow
def test_torch_compile_with_inductor_runs_on_the_cpu():
    p = torch_reference.torch_train_benchmark(tiny_config(), steps=1, warmup=1, torch_compile=True)
    assert p["compile"] == "torch.compile(inductor)" and p["step_seconds_median"] > 0


def test_the_pytorch_side_never_starts_a_jax_backend():
    """Started, JAX would take 75% of a GPU's memory before PyTorch runs (it runs first for that reason)."""
    code = ("from jax._src import xla_bridge; from dit_jax.perf import torch_reference; "
            "from tests.tiny_models import tiny_benchmark_config as tiny_config; "
            "p = torch_reference.torch_train_benchmark(tiny_config(), steps=1, warmup=1); "
            "print(p['step_seconds_median'] > 0, xla_bridge.backends_are_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "False"]


def test_pytorch_runs_before_jax_takes_the_device(monkeypatch):
    """JAX keeps the device memory it takes, so the PyTorch side must run (and free its memory) first."""
    order = []
    timing = {"step_seconds_median": 1.0, "step_seconds_min": 1.0}
    monkeypatch.setattr(torch_reference, "torch_train_benchmark", lambda *a, **k: order.append("torch") or dict(timing))
    monkeypatch.setattr(measure, "train_benchmark", lambda *a, **k: order.append("jax") or dict(timing))
    result = side_by_side.run(tiny_config(), steps=1, warmup=1, sample_steps=0, cfg_scale=1.0, with_torch=True)
    assert order == ["torch", "jax"] and result["torch_over_jax_step_time"] == {"median": 1.0, "min": 1.0}


def test_report_and_json(result):
    text = report.format_report(result)
    assert "MFU unknown" in text and "PyTorch / JAX step time" in text and "2-step guided DDPM" in text
    assert "peak device memory: n/a" in text and "start-up: first step finished" in text and "compile" in text
    assert json.loads(json.dumps(result)) == result


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="steps and warmup"):
        measure.train_benchmark(tiny_config(), steps=0, warmup=1)
    config = tiny_config()
    config.model.block_type = "in_context"
    with pytest.raises(ValueError, match="adaLN-Zero"):
        torch_reference.torch_train_benchmark(config, steps=1, warmup=1)


def test_cli_rejects_bad_flags():
    for args, expected in ((["--model", "DiT-M/3"], "DiT-M/3"), (["--mesh", "rows=2"], "rows=2"),
                           (["--attention", "flash"], "flash")):
        out = subprocess.run([sys.executable, "-m", "dit_jax.benchmark", *args], capture_output=True, text=True)
        assert out.returncode != 0 and expected in out.stderr


def test_make_config():
    config = measure.make_config("DiT-S/2", image_size=512, batch=4, dtype="bfloat16", mesh=["fsdp=2", "data=-1"],
                                   attention="cudnn")
    assert config.model.name == "DiT-S/2" and config.model.input_size == 64 and config.train.batch_size == 4
    assert config.attention == "cudnn" and config.remat == "none" and not config.model.scan_blocks
    scanned = measure.make_config("DiT-S/2", image_size=256, batch=4, dtype="float32", mesh=[], remat="dots",
                                    scan_blocks=True)
    assert scanned.remat == "dots" and scanned.model.scan_blocks
    switched = measure.make_config("DiT-S/2", image_size=256, batch=4, dtype="float32", mesh=[], qkv="split",
                                     gelu_backward="recompute", norm_modulate="fused")
    assert (switched.qkv, switched.gelu_backward, switched.norm_modulate) == ("split", "recompute", "fused")
    assert (scanned.qkv, scanned.gelu_backward, scanned.norm_modulate) == ("fused", "saved", "xla")
    with pytest.raises(ValueError, match="unknown compute switch 'gelu'"):
        measure.make_config("DiT-S/2", image_size=256, batch=4, dtype="float32", mesh=[], gelu="recompute")
    assert config.dtype == "bfloat16" and config.mesh.to_dict() == {"data": -1, "fsdp": 2, "tensor": 1}
    for mesh in (["rows=2"], ["data=two"], ["data"]):
        with pytest.raises(ValueError, match="axis=size"):
            measure.make_config("DiT-S/2", image_size=256, batch=4, dtype="float32", mesh=mesh)


@pytest.mark.slow  # a second compile of the step; test_train_figures (float32) is the fast sibling
def test_bfloat16_step():
    config = tiny_config()
    config.dtype = "bfloat16"
    t = measure.train_benchmark(config, steps=1, warmup=1)
    assert t["dtype"] == "bfloat16" and t["step_seconds_median"] > 0 and t["train_flops_per_image"] > 0


def test_loader_benchmark_reads_a_latents_folder(tmp_path):
    folder = write_latents(tmp_path, 96, std=0.1, shape=(4, 4, 4))
    result = measure.loader_benchmark(folder, batch_size=16, batches=5, warmup=2)
    assert result["latent_shape"] == [4, 4, 4] and result["batch"] == 16 and result["batches"] == 5
    assert result["latents_per_sec"] == pytest.approx(5 * 16 / result["seconds"])
    assert result["latents_per_cpu_sec"] > 0
    with pytest.raises(ValueError, match="batches"):
        measure.loader_benchmark(folder, batch_size=16, batches=0, warmup=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        measure.loader_benchmark(str(tmp_path / "missing"), batch_size=16, batches=1, warmup=0)


def test_inception_benchmark_checks_its_arguments():
    for bad in ({"batches": 0}, {"image_size": 4}, {"warmup": -1}):
        with pytest.raises(ValueError, match="image_size must be >= 8"):
            measure.inception_benchmark(None, **{"image_size": 32, "batch_size": 8, "batches": 1, "warmup": 0, **bad})


@pytest.mark.slow  # compiles the whole InceptionV3 (minutes on a loaded CPU)
def test_inception_benchmark_times_the_feature_extractor():
    tensors = inception.random_weights()
    assert all(np.isfinite(v).all() for v in tensors.values())  # (create_inception checks every name and shape)
    result = measure.inception_benchmark(None, image_size=32, batch_size=8, batches=2, warmup=1)
    assert result["batch"] == 8 and result["weights"] == "random"
    assert result["images_per_sec"] == pytest.approx(8 / result["step_seconds_median"])


def test_benchmark_and_sampling_import_without_tensorflow():
    """A GPU box without TensorFlow runs the benchmark: only the full run's CLU writers need it."""
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['clu'] = None\n"
            "import dit_jax.benchmark, dit_jax.sample, dit_jax.train")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sampling_side_by_side_times_both_chains_per_device_batch():
    result = side_by_side.sample_side_by_side(tiny_config(), num_steps=2, cfg_scale=4.0, repeats=2,
                                           per_device_batches=[1, 2], decode=False)
    assert [row["per_device_batch"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        p, f, j = row["torch"], row["torch_tf32"], row["jax"]
        assert p["device"] == "cpu" and p["images"] == f["images"] == row["per_device_batch"]
        assert j["images"] == 8 * row["per_device_batch"] and j["num_devices"] == 8
        assert p["precision"] == "float32" and f["precision"] == "float32+tf32"
        assert len(p["seconds"]) == len(j["seconds"]) == 2 and min(p["seconds"] + j["seconds"]) > 0
        assert j["hours_per_50k"] == pytest.approx(50_000 / j["images_per_sec"] / 3600)
        assert row["torch_over_jax_sample_time"]["torch_tf32"] == pytest.approx(
            j["images_per_sec"] / 8 / f["images_per_sec"])
    text = report.format_sample_report(result)
    assert text.count("h per 50K") == 6 and "without the VAE decode" in text
    assert json.loads(json.dumps(result)) == json.loads(json.dumps(result, default=str))
    with pytest.raises(ValueError, match="repeats"):
        torch_reference.torch_sample_benchmark(tiny_config(), num_steps=2, cfg_scale=4.0, repeats=0)


@pytest.mark.slow  # compiles the SD-VAE decoder for 8 devices; the sibling above runs without it
def test_sampling_side_by_side_decodes_with_the_vae_on_both_sides():
    config = tiny_config()
    config.dtype = "bfloat16"
    (row,) = side_by_side.sample_side_by_side(config, num_steps=2, cfg_scale=4.0, repeats=1,
                                           per_device_batches=[1])["rows"]
    assert row["torch"]["precision"] == "bfloat16 autocast" and row["torch_tf32"]["precision"] == "float32+tf32"
    assert row["torch"]["vae_decode"] and row["torch_tf32"]["vae_decode"] and row["jax"]["vae_decode"]
    assert min(row[side]["images_per_sec"] for side in ("torch", "torch_tf32", "jax")) > 0
