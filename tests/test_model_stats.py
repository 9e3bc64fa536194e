"""Parameter counts and XLA-counted Gflops of the 12 models against the official numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from dit_jax.models import MODELS
from dit_jax.model_stats import GFLOPS_TOLERANCE, PAPER_TABLE, model_stats, problems


# Models whose training step is also counted (the slow part to lower): S to XL, every patch size.
TRAIN_CHECKED = ("DiT-S/8", "DiT-B/4", "DiT-XL/2")


@pytest.fixture(scope="module")
def stats() -> dict[str, dict[str, Any]]:
    """``model_stats`` of every paper model, with the training step for ``TRAIN_CHECKED``."""
    return {name: model_stats(name, train=name in TRAIN_CHECKED) for name in MODELS}


def test_paper_table_covers_the_registry():
    assert set(PAPER_TABLE) == set(MODELS)


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_params_equal_official(stats, name):
    assert stats[name]["params"] == PAPER_TABLE[name].params
    assert stats[name]["params_match"] is True


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_gflops_match_paper(stats, name):
    gflops = stats[name]["gflops"]
    assert gflops == pytest.approx(PAPER_TABLE[name].gflops, rel=GFLOPS_TOLERANCE)
    assert stats[name]["gflops_diff_pct"] == pytest.approx(100 * (gflops / PAPER_TABLE[name].gflops - 1))
    assert problems(stats[name]) == []


@pytest.mark.parametrize("name", TRAIN_CHECKED)
def test_train_step_is_about_three_forwards(stats, name):
    # Backward costs about twice the forward: one matmul for the input grads, one for the weight grads.
    assert 2.5 < stats[name]["train_gflops"] / stats[name]["gflops"] < 4.0


def test_flops_are_per_image(stats):
    batched = model_stats("DiT-S/8", batch_size=3)
    for key in ("gflops", "train_gflops"):
        assert batched[key] == pytest.approx(stats["DiT-S/8"][key], rel=1e-4)


def test_overrides_skip_the_paper_comparison(stats):
    in_context = model_stats("DiT-S/8", train=False, block_type="in_context")
    assert in_context["params"] != stats["DiT-S/8"]["params"]
    assert in_context["official_params"] is None and in_context["gflops_diff_pct"] is None
    assert problems(in_context) == []


def test_problems_reports_mismatches(stats):
    row = stats["DiT-XL/2"]
    assert problems({**row, "params": row["params"] + 1, "params_match": False})
    assert problems({**row, "gflops_diff_pct": 1.5})


def test_cli_json():
    result = subprocess.run([sys.executable, "-m", "dit_jax.model_stats", "--json", "--models", "DiT-S/8"],
                            capture_output=True, text=True, check=True)
    (row,) = json.loads(result.stdout)
    assert row["model"] == "DiT-S/8" and row["params_match"] is True


def test_cli_rejects_unknown_model():
    result = subprocess.run([sys.executable, "-m", "dit_jax.model_stats", "--models", "DiT-M/3"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "DiT-M/3" in result.stderr
