"""Parameter counts and XLA-counted Gflops of the 12 models against the official numbers."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import Any, Callable

import pytest
from flax import nnx

from dit_jax.models import MODELS, count_params, create_model
from dit_jax.model_stats import GFLOPS_TOLERANCE, PAPER_SETTING, PAPER_TABLE, model_stats, problems


# Lowering a deep model's programs is the slow part (the training step about twice the forward): the default
# suite counts the forward of the S and B models and of DiT-XL/2, and the training step of DiT-S/8; `make
# test-all` adds the other L and XL models and the training steps of DiT-B/4 and DiT-XL/2.
FAST_GFLOPS = ("DiT-S/8", "DiT-S/4", "DiT-S/2", "DiT-B/8", "DiT-B/4", "DiT-B/2", "DiT-XL/2")
TRAIN_CHECKED = ("DiT-S/8", "DiT-B/4", "DiT-XL/2")


def slow_unless(fast: bool, name: str):
    return pytest.param(name, marks=() if fast else pytest.mark.slow)


@pytest.fixture(scope="module")
def stats() -> Callable[..., dict[str, Any]]:
    """``stats(name, train=False)``: ``model_stats`` of a paper model, each computed once."""
    return functools.cache(lambda name, train=False: model_stats(name, train=train))


def test_paper_table_covers_the_registry():
    assert set(PAPER_TABLE) == set(MODELS)


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_params_equal_official(name):
    """Every model's trainable parameter count (built abstractly: nothing lowered) is the official code's."""
    model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **PAPER_SETTING))
    assert count_params(model) == PAPER_TABLE[name].params


@pytest.mark.parametrize("name", [slow_unless(name in FAST_GFLOPS, name) for name in PAPER_TABLE])
def test_gflops_match_paper(stats, name):
    row = stats(name)
    assert row["params"] == PAPER_TABLE[name].params and row["params_match"] is True
    assert row["gflops"] == pytest.approx(PAPER_TABLE[name].gflops, rel=GFLOPS_TOLERANCE)
    assert row["gflops_diff_pct"] == pytest.approx(100 * (row["gflops"] / PAPER_TABLE[name].gflops - 1))
    assert problems(row) == []


@pytest.mark.parametrize("name", [slow_unless(name == "DiT-S/8", name) for name in TRAIN_CHECKED])
def test_train_step_is_about_three_forwards(stats, name):
    # Backward costs about twice the forward: one matmul for the input grads, one for the weight grads.
    row = stats(name, train=True)
    assert 2.5 < row["train_gflops"] / row["gflops"] < 4.0


def test_flops_are_per_image(stats):
    batched = model_stats("DiT-S/8", batch_size=3)
    for key in ("gflops", "train_gflops"):
        assert batched[key] == pytest.approx(stats("DiT-S/8", train=True)[key], rel=1e-4)


def test_overrides_skip_the_paper_comparison(stats):
    in_context = model_stats("DiT-S/8", train=False, block_type="in_context")
    assert in_context["params"] != stats("DiT-S/8")["params"]
    assert in_context["official_params"] is None and in_context["gflops_diff_pct"] is None
    assert problems(in_context) == []


def test_problems_reports_mismatches(stats):
    row = stats("DiT-XL/2")
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
