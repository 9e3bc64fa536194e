"""The GPU sweep end to end on the CPU with a tiny model: rows in fresh processes, failures as rows,
the FLOP count, the profile and its time split; and the plan's XLA flags exist."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dit_jax import benchmark, sweep, train
from tests.conftest import TINY_SWEEP_BASE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A two-row sweep of the tiny model (one row with a misspelt XLA flag) and its profile."""
    tmp = tmp_path_factory.mktemp("sweep")
    rows = [{"name": "dots, scanned, GPU flags", "batch": 8, "remat": "dots", "scan_blocks": True,
             "xla_flags": [sweep.NO_TRITON_GEMM, sweep.LATENCY_HIDING]},
            {"name": "typo", "batch": 8, "xla_flags": ["--xla_gpu_enable_tritn_gemm=false"]}]
    lines = []
    result = sweep.sweep(TINY_SWEEP_BASE, rows, steps=2, warmup=1, budget_s=1800, row_timeout_s=600, profile_steps=2,
                         profile_reserve_s=60, out=str(tmp / "sweep.json"), profile_dir=str(tmp / "profile"),
                         log=lines.append)
    return result, "\n".join(lines), tmp


@pytest.mark.slow  # four subprocesses; the plan, flag, classify and bad-row tests are the fast ones
def test_rows_are_measured_in_their_own_processes_and_failures_are_rows(swept):
    result, printed, tmp = swept
    ok, typo = result["rows"]
    assert ok["status"] == "ok", ok
    assert ok["row"]["remat"] == "dots" and ok["scan_blocks"] and ok["remat"] == "dots" and ok["batch"] == 8
    assert 0 < ok["step_seconds_min"] <= ok["step_seconds_median"]
    assert ok["images_per_sec"] == pytest.approx(8 / ok["step_seconds_median"])
    assert ok["peak_memory_bytes"] is None and ok["peak_flops_per_sec"] is None and ok["mfu"] is None  # a CPU
    startup = ok["startup"]
    assert set(startup) == {"init_seconds", "trace_seconds", "compile_seconds", "first_step_seconds",
                            "since_start_seconds"}
    assert startup["since_start_seconds"] > startup["compile_seconds"] > 0
    assert ok["since_launch_seconds"] >= startup["since_start_seconds"]
    assert typo["status"] == "failed" and "tritn" in typo["error"]
    # The model FLOPs per image, counted once in a CPU process, equal the benchmark's own count.
    config = sweep.row_config(TINY_SWEEP_BASE, sweep.resolve_rows([{"name": "x", "batch": 8}])[0])
    expected = benchmark.train_benchmark(config, steps=1, warmup=1)["train_flops_per_image"]
    assert result["train_flops_per_image"]["8"] == pytest.approx(expected, rel=1e-6)
    assert ok["train_flops_per_image"] == result["train_flops_per_image"]["8"]
    assert json.loads((tmp / "sweep.json").read_text()) == json.loads(json.dumps(result))
    assert "| typo | 8 | xla | none | no | enable_tritn_gemm=false | failed:" in printed
    assert "| dots, scanned, GPU flags | 8 | xla | dots | yes |" in printed and "| ok |" in printed


@pytest.mark.slow  # shares the end-to-end sweep above
def test_the_best_row_is_profiled_and_its_time_split(swept):
    result, printed, _ = swept
    profile = result["profile"]
    assert profile["status"] == "ok" and profile["row"] == "dots, scanned, GPU flags"
    split = profile["split"]
    assert set(split["seconds"]) == set(sweep.CATEGORIES)
    assert split["events"] > 0 and 0 < split["busy_seconds"] and split["wall_seconds"] > 0
    assert split["seconds"]["matmul"] > 0 and split["seconds"]["optimizer_ema"] > 0
    assert split["seconds"]["attention"] > 0 and split["seconds"]["elementwise_norm"] > 0
    assert split["top_ops"] and {o["category"] for o in split["top_ops"]} <= set(sweep.CATEGORIES)
    assert "profile of 'dots, scanned, GPU flags': per step" in printed and "gaps" in printed


def test_time_out_and_skipped_rows_are_reported(monkeypatch):
    rows = sweep.resolve_rows([{"name": "slow"}, {"name": "late"}])
    result = sweep.run_row(TINY_SWEEP_BASE, rows[0], steps=1, warmup=1, timeout_s=0.5)
    assert result["status"] == "timeout" and "no result within" in result["error"]
    monkeypatch.setattr(sweep, "_start_count", lambda *a: subprocess.Popen(
        [sys.executable, "-c", "raise SystemExit('no count here')"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
    out = sweep.sweep(TINY_SWEEP_BASE, rows, steps=1, warmup=1, budget_s=0, row_timeout_s=10, profile_steps=0,
                      profile_reserve_s=0, out=None, profile_dir="unused", log=lambda line: None)
    assert [r["status"] for r in out["rows"]] == ["skipped", "skipped"]
    assert out["flops_count_problem"].startswith("FLOP count failed") and "profile" not in out


def test_classify_reads_the_compiled_program():
    hlo = """HloModule m, entry_computation_layout={(f32[2]{0})->f32[2]{0}}

%fused_dot (p0: f32[8,16,32], p1: f32[32,96]) -> f32[8,16,96] {
  %p0 = f32[8,16,32]{2,1,0} parameter(0)
  ROOT %dot.1 = f32[8,16,96]{2,1,0} dot(%p0, %p1), lhs_contracting_dims={2}, rhs_contracting_dims={0}
}

%fused_softmax (p0: f32[8,2,16,16]) -> f32[8,2,16,16] {
  ROOT %exponential.3 = f32[8,2,16,16]{3,2,1,0} exponential(%p0)
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %fusion.1 = f32[8,16,96]{2,1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(f)/mlp/dot"}
  %fusion.2 = f32[8,2,16,16]{3,2,1,0} fusion(%c), kind=kLoop, calls=%fused_softmax
  %custom-call.3 = bf16[8,16,2,64]{3,2,1,0} custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  %multiply.4 = f32[32,96]{1,0} multiply(%w, %x), metadata={op_name="jit(f)/optimizer_ema/mul"}
  %add.5 = f32[8,16,32]{2,1,0} add(%y, %z), metadata={op_name="jit(f)/block/add"}
  %custom-call.6 = f32[8,16,96]{2,1,0} custom-call(%y, %w), custom_call_target="__cublas$gemm"
  %all-reduce.7 = f32[8,16,32]{2,1,0} all-reduce(%y), replica_groups={}
  ROOT %while.8 = f32[2]{0} while(%a), condition=%cond, body=%body
}
"""
    instructions, computations = sweep.parse_hlo(hlo)
    assert set(computations) == {"fused_dot", "fused_softmax", "main"}
    kinds = {name: sweep.classify(instructions[name], computations, tokens=16, optimizer_scope=train.OPTIMIZER_SCOPE)
             for name in ("fusion.1", "fusion.2", "custom-call.3", "multiply.4", "add.5", "custom-call.6",
                          "all-reduce.7")}
    assert kinds == {"fusion.1": "matmul", "fusion.2": "attention", "custom-call.3": "attention",
                     "multiply.4": "optimizer_ema", "add.5": "elementwise_norm", "custom-call.6": "matmul",
                     "all-reduce.7": "other"}
    assert sweep._CONTAINERS.search(instructions["while.8"]) and not sweep._CONTAINERS.search(
        instructions["custom-call.6"])
    assert sweep._union_seconds([(0, 2e6), (1e6, 3e6), (5e6, 6e6)]) == pytest.approx(4.0)


def test_the_gpu_plan_is_valid_and_its_xla_flags_exist():
    """Every XLA flag of GPU_PLAN is known to this XLA (a misspelt flag aborts the backend's start)."""
    rows = sweep.resolve_rows(sweep.GPU_PLAN)
    assert {r["attention"] for r in rows} == {"xla", "cudnn"} and {r["batch"] for r in rows} == {128, 256}
    assert {r["remat"] for r in rows} == {"none", "block", "dots"} and any(r["scan_blocks"] for r in rows)
    for row in rows:
        sweep.row_config({"model": "DiT-XL/2", "image_size": 256, "dtype": "bfloat16"}, row)
    flags = sorted({f for r in rows for f in r["xla_flags"]})
    assert flags == sorted([sweep.LATENCY_HIDING, sweep.NO_TRITON_GEMM, sweep.NO_COMMAND_BUFFERS])
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]


def test_bad_rows_and_overrides_are_rejected():
    with pytest.raises(ValueError, match="needs a name"):
        sweep.resolve_rows([{"batch": 8}])
    with pytest.raises(ValueError, match=r"unknown keys \['bach'\]"):
        sweep.resolve_rows([{"name": "a", "bach": 8}])
    with pytest.raises(ValueError, match="xla_flags"):
        sweep.resolve_rows([{"name": "a", "xla_flags": "xla_gpu_enable_triton_gemm=false"}])
    assert sweep.parse_overrides(["model.depth=2", "model.name="]) == {"model.depth": 2, "model.name": ""}
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_overrides(["model.depth"])
    with pytest.raises(ValueError, match="unknown config field 'model.dept'"):
        sweep.row_config({**TINY_SWEEP_BASE, "overrides": {"model.dept": 2}}, sweep.resolve_rows([{"name": "a"}])[0])


def test_cli_rejects_a_bad_rows_file(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"name": "a", "remat": "most"}]))
    out = subprocess.run([sys.executable, "-m", "dit_jax.sweep", "--rows", str(rows)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode != 0 and "remat 'most' is not one of" in out.stderr


H200_PROFILE = ROOT / "tests" / "data" / "h200_xl2_b256_cudnn"  # one step of DiT-XL/2, batch 256, cuDNN attention


def test_kernel_names_are_instruction_names_with_underscores():
    assert sweep.kernel_name("input_add_reduce_fusion.233") == "input_add_reduce_fusion_233"
    assert sweep.kernel_name("input_reduce_fusion") == "input_reduce_fusion"
    assert sweep.kernel_name("wrapped_convert.12") == "wrapped_convert_12"
    assert sweep.kernel_name("custom-call.3") == "custom_call_3"


def test_time_split_of_an_h200_profile_in_cuda_command_buffers():
    """The measured H200 step (404.5 ms median; its kernels named by kernel, ``hlo_op`` the command buffer)
    splits as /work/shared/perf/README.md reads it: GEMMs ~59%, cuDNN attention ~11%, GPU busy ~96%."""
    wall = 0.4045
    split = sweep.time_split(str(H200_PROFILE), wall, tokens=256)
    share = {name: seconds / wall for name, seconds in split["seconds"].items()}
    assert split["steps"] == 1 and split["events"] > 2000
    assert 0.55 <= share["matmul"] <= 0.63
    assert 0.09 <= share["attention"] <= 0.125  # flash fprop + bprop 9%, cuDNN's dO.O and dQ passes 2%
    assert 0.18 <= share["elementwise_norm"] <= 0.30 and share["optimizer_ema"] > 0.005 and share["other"] < 0.01
    assert 0 < split["gaps_seconds"] / wall < 0.10
    assert split["busy_seconds"] == pytest.approx(sum(split["seconds"].values()), rel=0.01)  # one stream: no overlap
    fusions = [o for o in split["top_ops"] if o["category"] not in ("matmul", "attention")]
    assert fusions[0]["op"] == "input_add_reduce_fusion.233" and fusions[0]["category"] == "elementwise_norm"
    assert fusions[0]["seconds"] == pytest.approx(0.0216, abs=0.0005)
    assert split["top_ops"][0]["op"].startswith("nvjet_sm90") and split["top_ops"][0]["category"] == "matmul"


def test_time_split_command_prints_a_saved_profile(tmp_path):
    """``--time_split DIR`` reads a plain (not gzipped) module text too and takes the wall time from the trace."""
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "perfetto_trace.json.gz").write_bytes((H200_PROFILE / "perfetto_trace.json.gz").read_bytes())
    with gzip.open(H200_PROFILE / "train_step.hlo.txt.gz", "rt") as f:
        (tmp_path / benchmark.PROFILE_HLO).write_text(f.read())
    out = subprocess.run([sys.executable, "-m", "dit_jax.sweep", "--time_split", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    head, top = out.stdout.strip().splitlines()
    wall_ms = float(re.search(r"per step \(([\d.]+) ms wall", head).group(1))
    assert 380 < wall_ms < 405  # the span of the step's kernels
    matmul = re.search(r"matmul ([\d.]+) ms \((\d+)%\)", head)
    assert 225 < float(matmul.group(1)) < 245 and 55 <= int(matmul.group(2)) <= 63
    assert top.startswith("top ops per step: nvjet_sm90") and "(attention)" in top  # cuBLAS GEMMs, cuDNN's backward
