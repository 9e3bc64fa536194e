"""The parity command: every array of the official reference matches, and the tool is config-driven."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from dit_jax import parity
from dit_jax.models import DiT
from dit_jax.weights import convert

from tests.torch_references import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[1]
SHARED_FILE = REFERENCE_DIR / "dit_official_tiny.npz"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dit_jax.parity", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_every_reference_array_matches_the_official_code():
    results, unknown = parity.run_parity(str(SHARED_FILE))
    assert not unknown
    names = {r.name for r in results}
    # Every output group the reference README lists is recomputed, not skipped.
    for required in ("forward", "cfg/forward_with_cfg", "loss/loss", "loss/mse", "loss/vb", "loss/x_t",
                     "pmv/mean", "pmv/variance", "pmv/log_variance", "pmv/pred_xstart", "psample/sample",
                     "ddim/sample", "ddim_cfg/sample", "respace/250/betas", "respace/ddim10/timestep_map"):
        assert required in names
    failures = [(r.name, r.error) for r in results if not r.passed]
    assert not failures
    # Well inside the tolerances, not scraping by.
    assert max(r.error for r in results) < 1e-5


@pytest.mark.slow  # the command in a subprocess; test_every_reference_array_matches_the_official_code checks the same arrays in-process
def test_cli_passes_on_the_shared_reference():
    proc = _run_cli(str(SHARED_FILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "21 of 21 arrays match" in proc.stdout
    assert "FAIL" not in proc.stdout


def _random_official_reference(tmp_path: Path, config: dict, seed: int = 0) -> Path:
    """A reference file in the shared format for another DiT config: random weights exported to the
    official layout, inputs, and the outputs our code computes for them."""
    model = DiT(**config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var[...] = (0.08 * rng.standard_normal(var[...].shape)).astype(np.float32)
    s, c, k = config["input_size"], config["in_channels"], config["num_classes"]
    nchw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    arrays = {f"param/{n}": v for n, v in convert.to_official_state_dict(model).items()}
    arrays.update({
        "x": nchw(3, c, s, s), "t": np.array([0, 10, 999]), "y": np.array([0, k - 1, k]),
        "cfg/x": nchw(4, c, s, s), "cfg/t": np.array([0, 5, 0, 5]), "cfg/y": np.array([1, 2, k, k]),
        "cfg/scale": np.array(3.0),
        "loss/x_start": nchw(3, c, s, s), "loss/t": np.array([0, 1, 500]), "loss/noise": nchw(3, c, s, s),
        "loss/y": np.array([0, 1, 2]),
        "pmv/x_t": nchw(3, c, s, s), "pmv/t": np.array([0, 4, 9]), "pmv/y": np.array([0, 1, 2]),
        "psample/noise": nchw(3, c, s, s),
        "ddim/noise": nchw(2, c, s, s), "ddim/y": np.array([1, 2]),
        "ddim_cfg/noise": nchw(4, c, s, s), "ddim_cfg/y": np.array([1, 2, k, k]), "ddim_cfg/scale": np.array(1.5),
    })
    outputs = parity.compute_outputs(model, arrays)
    wanted = ["forward", "cfg/forward_with_cfg", "loss/x_t", "loss/loss", "loss/mse", "pmv/mean", "pmv/variance",
              "pmv/log_variance", "pmv/pred_xstart", "psample/sample", "ddim/sample", "ddim_cfg/sample"]
    if config["learn_sigma"]:
        wanted.append("loss/vb")
    arrays.update({name: np.asarray(outputs[name]()) for name in wanted})
    path = tmp_path / "other.npz"
    np.savez(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps(config))
    return path


OTHER = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=7,
             learn_sigma=False, class_dropout_prob=0.1)


def test_report_follows_the_config_and_its_exit_code_reports_failures(tmp_path, capsys):
    path = _random_official_reference(tmp_path, OTHER)
    assert parity.report(str(path)) == 0
    assert "12 of 12 arrays match" in capsys.readouterr().out  # learn_sigma off: no vb array

    with np.load(path) as f:
        arrays = dict(f)
    arrays["forward"] = arrays["forward"] * 1.001  # a 1e-3 relative error
    arrays["something/new"] = np.zeros(3)
    np.savez(path, **arrays)
    assert parity.report(str(path)) == 1
    out = capsys.readouterr().out
    assert "FAIL  forward" in out
    assert "FAIL  something/new" in out and "unknown array" in out
    assert "11 of 13 arrays match; 2 FAILED" in out


def test_reference_of_another_model_is_rejected_clearly(tmp_path):
    path = _random_official_reference(tmp_path, OTHER)
    other = dict(OTHER, depth=2)  # the config says 2 blocks, the weights have 3
    config_path = tmp_path / "wrong.json"
    config_path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): blocks\.2\."):
        parity.run_parity(str(path), str(config_path))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        parity.run_parity(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "lonely.npz", x=np.zeros(1))
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        parity.run_parity(str(tmp_path / "lonely.npz"))
