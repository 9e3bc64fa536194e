"""The GPU sweep end to end on the CPU with a tiny model: rows in fresh processes, failures as rows,
the FLOP count, the profile and its time split; and the plan's XLA flags exist."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dit_jax import train
from dit_jax.perf import measure, plan, runner, time_split, trace
from tests.tiny_models import TINY_SWEEP_BASE

ROOT = Path(__file__).resolve().parents[1]


FLAGS = ["--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_latency_hiding_scheduler=true"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep of the tiny model: three rows sharing XLA flags (one fails while building its model), one row
    with a misspelt XLA flag, and the profile of the best."""
    tmp = tmp_path_factory.mktemp("sweep")
    rows = [{"name": "dots, scanned", "batch": 8, "set": {"remat": "dots", "model.scan_blocks": True},
             "xla_flags": FLAGS},
            {"name": "typo", "batch": 8, "xla_flags": ["--xla_gpu_enable_tritn_gemm=false"]},
            {"name": "bad remat", "batch": 8, "set": {"remat": "most"}, "xla_flags": FLAGS},
            {"name": "plain b16", "batch": 16, "xla_flags": FLAGS}]
    lines = []
    result = runner.sweep(TINY_SWEEP_BASE, rows, steps=2, warmup=1, budget_s=1800, row_timeout_s=600, profile_steps=2,
                         profile_reserve_s=60, out=str(tmp / "sweep.json"), profile_dir=str(tmp / "profile"),
                         compilation_cache=str(tmp / "cache"), log=lines.append)
    return result, "\n".join(lines), tmp


@pytest.mark.slow  # four subprocesses; the plan, flag, classify and bad-row tests are the fast ones
def test_rows_sharing_xla_flags_share_a_process_and_failures_are_rows(swept):
    result, printed, tmp = swept
    ok, typo, bad, small = result["rows"]  # the plan's order, though the typo's process ran last
    assert ok["status"] == "ok" and small["status"] == "ok", (ok, small)
    assert ok["pid"] == bad["pid"] == small["pid"]  # one process for the three rows of one flag set
    assert ok["remat"] == "dots" and ok["scan_blocks"] and ok["batch"] == 8 and small["batch"] == 16
    assert 0 < ok["step_seconds_min"] <= ok["step_seconds_median"]
    assert ok["images_per_sec"] == pytest.approx(8 / ok["step_seconds_median"])
    assert ok["peak_memory_bytes"] is None and ok["peak_flops_per_sec"] is None and ok["mfu"] is None  # a CPU
    startup = ok["startup"]
    assert set(startup) == {"init_seconds", "trace_seconds", "compile_seconds", "first_step_seconds",
                            "since_start_seconds"}
    assert startup["since_start_seconds"] > startup["compile_seconds"] > 0
    assert ok["since_launch_seconds"] >= startup["since_start_seconds"]  # the first row pays the process's start
    assert ok["compilation_cache"]["dir"] == str(tmp / "cache")
    assert 0 < small["since_launch_seconds"] < small["startup"]["since_start_seconds"]  # a later row does not
    assert bad["status"] == "failed" and "remat 'most' is not one of" in bad["error"]
    assert typo["status"] == "failed" and "tritn" in typo["error"]
    # The model FLOPs per image, counted once in a CPU process, equal the benchmark's own count.
    config = plan.row_config(TINY_SWEEP_BASE, plan.resolve_rows([{"name": "x", "batch": 8}])[0])
    expected = measure.train_benchmark(config, steps=1, warmup=1)["train_flops_per_image"]
    assert result["train_flops_per_image"]["8"] == pytest.approx(expected, rel=1e-6)
    assert ok["train_flops_per_image"] == result["train_flops_per_image"]["8"]
    assert json.loads((tmp / "sweep.json").read_text()) == json.loads(json.dumps(result))
    assert "| typo | 8 | - | enable_tritn_gemm=false | failed:" in printed
    assert "| dots, scanned | 8 | remat=dots model.scan_blocks=true | enable_triton_gemm=false" in printed
    assert "| ok |" in printed and "in 2 processes" in printed


@pytest.mark.slow  # shares the end-to-end sweep above
def test_the_best_row_is_profiled_and_its_time_split(swept):
    result, printed, _ = swept
    profile = result["profile"]
    fastest = max((r for r in result["rows"] if r["status"] == "ok"), key=lambda r: r["images_per_sec"])
    assert profile["status"] == "ok" and profile["row"] == fastest["row"]["name"]  # in images/s
    split = profile["split"]
    assert set(split["seconds"]) == set(time_split.CATEGORIES)
    assert split["events"] > 0 and 0 < split["busy_seconds"] and split["wall_seconds"] > 0
    assert split["seconds"]["matmul"] > 0 and split["seconds"]["optimizer_ema"] > 0
    assert split["seconds"]["attention"] > 0 and split["seconds"]["elementwise_norm"] > 0
    assert split["top_ops"] and {o["category"] for o in split["top_ops"]} <= set(time_split.CATEGORIES)
    assert f"profile of {fastest['row']['name']!r} (its step " in printed and "cache): per step" in printed
    assert "gaps" in printed and isinstance(profile["compile_warm"], bool)


def test_a_group_reports_oom_and_goes_on(monkeypatch, capsys):
    """In the group child an out-of-memory row is reported ``oom`` and the next row runs; a row whose
    estimated cost does not fit before the deadline is skipped."""
    def fake_measure(spec, row, started):
        if row["name"] == "big":
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99.00GiB.\nmore")
        return {"step_seconds_median": 0.1, "since_launch_seconds": time.time() - started}

    monkeypatch.setattr(runner, "_measure_here", fake_measure)
    rows = plan.resolve_rows([{"name": "big"}, {"name": "small"}, {"name": "late"}])
    runner.group_child({"rows": rows, "costs": [1, 1, 1e9], "launched_at": time.time(),
                           "deadline": time.time() + 600})
    results = [json.loads(line.removeprefix(runner._RESULT_MARK)) for line in capsys.readouterr().out.splitlines()]
    assert [r["status"] for r in results] == ["oom", "ok", "skipped"]
    assert results[0]["error"].startswith("RESOURCE_EXHAUSTED") and results[1]["step_seconds_median"] == 0.1


def test_time_out_and_skipped_rows_are_reported(monkeypatch):
    rows = plan.resolve_rows([{"name": "slow"}, {"name": "late"}])
    seen = []
    stopped = runner._run_child(TINY_SWEEP_BASE, rows, steps=1, warmup=1, deadline=time.monotonic() + 600,
                               row_timeout_s=0.5, on_result=seen.append, compilation_cache="off")
    assert seen == [] and stopped["status"] == "timeout" and stopped["row"]["name"] == "slow"
    assert "no result within" in stopped["error"]
    monkeypatch.setattr(runner, "_start_count", lambda *a: subprocess.Popen(
        [sys.executable, "-c", "raise SystemExit('no count here')"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
    out = runner.sweep(TINY_SWEEP_BASE, rows, steps=1, warmup=1, budget_s=0, row_timeout_s=10, profile_steps=0,
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
    instructions, computations = trace.parse_hlo(hlo)
    assert set(computations) == {"fused_dot", "fused_softmax", "main"}
    kinds = {name: time_split.classify(instructions[name], computations, tokens=16,
                                       optimizer_scope=train.OPTIMIZER_SCOPE)
             for name in ("fusion.1", "fusion.2", "custom-call.3", "multiply.4", "add.5", "custom-call.6",
                          "all-reduce.7")}
    assert kinds == {"fusion.1": "matmul", "fusion.2": "attention", "custom-call.3": "attention",
                     "multiply.4": "optimizer_ema", "add.5": "elementwise_norm", "custom-call.6": "matmul",
                     "all-reduce.7": "other"}
    assert trace._CONTAINERS.search(instructions["while.8"]) and not trace._CONTAINERS.search(
        instructions["custom-call.6"])
    assert trace.union_seconds([(0, 2e6), (1e6, 3e6), (5e6, 6e6)]) == pytest.approx(4.0)


def test_the_gpu_plan_is_valid_its_xla_flags_exist_and_it_fits_eight_minutes():
    """Every XLA flag of GPU_PLAN is known to this XLA (a misspelt flag aborts the backend's start); by the
    cost model at least 8 rows and the profile fit the default budget."""
    rows = plan.resolve_rows(plan.GPU_PLAN)
    assert len(rows) >= 8 and {r["batch"] for r in rows} == {32, 128, 256}
    assert {k for r in rows for k in r["set"]} >= set(plan.SWITCHES)
    assert [len(g) for g in plan.group_rows(rows)] == [len(rows) - 1, 1]  # the cuBLASLt row alone
    estimated = plan.estimate(rows, steps=6, warmup=2, budget_s=480, profile_steps=3)
    ran = [p for p in estimated["rows"] if p["finish_s"] is not None]
    assert len(ran) >= 8 and estimated["total_s"] <= 480 and ran[0]["row"]["name"] == "b256 baseline"
    flags = sorted({f for r in rows for f in r["xla_flags"]})
    assert flags == [plan.CUBLASLT]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]


def test_the_gpu_plan_builds_its_xl2_configs():
    """Every row of GPU_PLAN builds a DiT-XL/2 config whose switches are valid, non-default modes."""
    from dit_jax.model_compute import SWITCH_FIELDS

    assert all(SWITCH_FIELDS[k].index(v) > 0 for k, v in plan.SWITCHES.items())  # the first mode is the plain path
    for row in plan.resolve_rows(plan.GPU_PLAN):
        config = plan.row_config({"model": "DiT-XL/2", "image_size": 256, "dtype": "bfloat16"}, row)
        assert config.train.batch_size == row["batch"] and config.model.hidden_size == 1152
        for key, value in row["set"].items():
            assert config[key] == value  # top-level or dotted
        assert all(config[k] in SWITCH_FIELDS[k] for k in SWITCH_FIELDS)


def test_the_estimate_follows_the_sweeps_rule():
    """A later flag set's rows keep their time: the first group's last rows are skipped, not the second's."""
    rows = plan.resolve_rows([{"name": "a", "batch": 256}, {"name": "b", "batch": 256},
                               {"name": "c", "batch": 256, "xla_flags": [plan.CUBLASLT]}])
    one = plan.row_seconds(rows[0], steps=6, warmup=2)
    budget = 2 * plan.COST["process_s"] + 2 * one + 1  # room for two rows, no profile
    estimated = plan.estimate(rows, steps=6, warmup=2, budget_s=budget, profile_steps=0)
    assert [p["finish_s"] is not None for p in estimated["rows"]] == [True, False, True]
    assert estimated["total_s"] == pytest.approx(2 * plan.COST["process_s"] + 2 * one)
    assert one == pytest.approx(plan.COST["init_s"] + plan.COST["compile_s"] + 8 * (0.01 + 0.00155 * 256))


def test_plan_command_prints_rows_and_estimate(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"name": "b256 plain", "batch": 256}, {"name": "b32 dots", "batch": 32,
                                                                         "set": {"remat": "dots"}}]))
    out = subprocess.run([sys.executable, "-m", "dit_jax.sweep", "--plan", "--rows", str(rows)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| b32 dots | 32 | remat=dots | - | 0 |" in out.stdout and "yes |" in out.stdout
    assert re.search(r"estimate: \d+ s for 2 of 2 rows and the profile \(60 s\) within the budget of 480 s",
                     out.stdout)


def test_bad_rows_and_overrides_are_rejected():
    with pytest.raises(ValueError, match="needs a name"):
        plan.resolve_rows([{"batch": 8}])
    with pytest.raises(ValueError, match=r"unknown keys \['remat'\]"):
        plan.resolve_rows([{"name": "a", "remat": "dots"}])
    with pytest.raises(ValueError, match="xla_flags"):
        plan.resolve_rows([{"name": "a", "xla_flags": "xla_gpu_enable_triton_gemm=false"}])
    with pytest.raises(ValueError, match="set must map"):
        plan.resolve_rows([{"name": "a", "set": [["remat", "dots"]]}])
    assert plan.parse_overrides(["model.depth=2", "model.name="]) == {"model.depth": 2, "model.name": ""}
    with pytest.raises(ValueError, match="key=value"):
        plan.parse_overrides(["model.depth"])
    with pytest.raises(ValueError, match="unknown config field 'model.dept'"):
        plan.row_config({**TINY_SWEEP_BASE, "overrides": {"model.dept": 2}}, plan.resolve_rows([{"name": "a"}])[0])
    row = plan.resolve_rows([{"name": "a", "batch": 4, "set": {"remat": "dots", "model.scan_blocks": True}}])[0]
    config = plan.row_config(TINY_SWEEP_BASE, row)
    assert config.remat == "dots" and config.model.scan_blocks is True and config.train.batch_size == 4
    with pytest.raises(ValueError, match="'model.scan_blocks' is true or false"):
        plan.row_config(TINY_SWEEP_BASE, {**row, "set": {"model.scan_blocks": "yes"}})
    with pytest.raises(ValueError, match="unknown config field 'remat.x'"):
        plan.row_config(TINY_SWEEP_BASE, {**row, "set": {"remat.x": 1}})


def test_cli_rejects_a_bad_rows_file(tmp_path):
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"name": "a", "set": {"remat_mode": "dots"}}]))
    out = subprocess.run([sys.executable, "-m", "dit_jax.sweep", "--rows", str(rows)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode != 0 and "unknown config field 'remat_mode'" in out.stderr


H200_PROFILE = ROOT / "tests" / "data" / "h200_xl2_b256_cudnn"  # one step of DiT-XL/2, batch 256, cuDNN attention


def test_kernel_names_are_instruction_names_with_underscores():
    assert trace.kernel_name("input_add_reduce_fusion.233") == "input_add_reduce_fusion_233"
    assert trace.kernel_name("input_reduce_fusion") == "input_reduce_fusion"
    assert trace.kernel_name("wrapped_convert.12") == "wrapped_convert_12"
    assert trace.kernel_name("custom-call.3") == "custom_call_3"


def test_time_split_of_an_h200_profile_in_cuda_command_buffers():
    """The measured H200 step (404.5 ms median; its kernels named by kernel, ``hlo_op`` the command buffer)
    splits as /work/shared/perf/README.md reads it: GEMMs ~59%, cuDNN attention ~11%, GPU busy ~96%."""
    wall = 0.4045
    split = time_split.of_profile(str(H200_PROFILE), wall, tokens=256)
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
        (tmp_path / trace.PROFILE_HLO).write_text(f.read())
    out = subprocess.run([sys.executable, "-m", "dit_jax.sweep", "--time_split", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    head, top = out.stdout.strip().splitlines()
    wall_ms = float(re.search(r"per step \(([\d.]+) ms wall", head).group(1))
    assert 380 < wall_ms < 405  # the span of the step's kernels
    matmul = re.search(r"matmul ([\d.]+) ms \((\d+)%\)", head)
    assert 225 < float(matmul.group(1)) < 245 and 55 <= int(matmul.group(2)) <= 63
    assert top.startswith("top ops per step: nvjet_sm90") and "(attention)" in top  # cuBLAS GEMMs, cuDNN's backward
