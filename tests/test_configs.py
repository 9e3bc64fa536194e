"""Every config in configs/ builds its model; the paper configs carry the paper's recipe and sizes."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from flax import nnx

from dit_jax import train_state
from dit_jax.models import count_params
from dit_jax.model_stats import PAPER_TABLE

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py") if p.stem != "__init__")
PAPER_256 = {f"dit_{name[4:].replace('/', '').lower()}_256": name for name in PAPER_TABLE}


def load(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


def test_one_config_per_paper_model():
    assert set(PAPER_256) <= set(CONFIGS)
    assert "dit_xl2_512" in CONFIGS and "default" in CONFIGS


@pytest.mark.parametrize("name", sorted(PAPER_256))
def test_paper_configs_build_the_paper_model_with_the_paper_recipe(name):
    c = load(name)
    model = nnx.eval_shape(lambda: train_state.build_model(c, rngs=nnx.Rngs(0)))
    assert count_params(model) == PAPER_TABLE[PAPER_256[name]].params
    assert (c.model.input_size, c.model.in_channels, c.model.num_classes) == (32, 4, 1000)
    assert (c.train.lr, c.train.weight_decay, c.train.batch_size, c.train.ema_decay) == (1e-4, 0.0, 256, 0.9999)
    assert c.model.class_dropout_prob == 0.1 and c.model.learn_sigma
    assert c.data.random_flip  # the paper's only augmentation
    assert c.data.source == "latents"
    # Evaluations: a sample grid, and FID-10K at the paper's sampling settings, off until a reference is given.
    assert (c.evals.samples.type, c.evals.samples.every) == ("grid", 10_000)
    assert (c.evals.fid.type, c.evals.fid.num_samples, c.evals.fid.cfg_scale, c.evals.fid.respacing,
            c.evals.fid.reference) == ("fid", 10_000, 1.5, "250", "")


def test_512_config_uses_64x64_latents():
    c = load("dit_xl2_512")
    model = nnx.eval_shape(lambda: train_state.build_model(c, rngs=nnx.Rngs(0)))
    assert model.pos_embed.shape == (1, 1024, 1152)
    # Same trainable weights as at 256: the position table is fixed, not trained.
    assert count_params(model) == PAPER_TABLE["DiT-XL/2"].params


def test_default_config_is_a_small_pixel_space_model():
    c = load("default")
    model = nnx.eval_shape(lambda: train_state.build_model(c, rngs=nnx.Rngs(0)))
    assert c.data.source == "synthetic" and c.model.in_channels == 3 and c.model.num_classes >= 10
    assert count_params(model) < 10_000_000  # a CPU-sized model, far below DiT-S (33M)
    assert c.evals.class_consistency.type == "class_consistency" and c.evals.class_consistency.every == 0
