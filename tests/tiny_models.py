"""Tiny models and the configs that run them in seconds (a test's model is small, its run a few steps).

Config helpers (``set_field``, ``flat_fields``) write dotted fields as the command line does.
"""

from __future__ import annotations

from typing import Any


def set_field(config: Any, field: str, value: Any) -> None:
    """``config.a.b.c = value`` for ``field="a.b.c"`` (a dotted path, as on the command line)."""
    *sections, key = field.split(".")
    for section in sections:
        config = config[section]
    config[key] = value


def flat_fields(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config overrides as dotted fields: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        out.update(flat_fields(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# The sweep's base settings for a tiny DiT (``perf.plan.row_config``): 51k parameters, 8x8x4 inputs.
TINY_SWEEP_BASE = {"model": "DiT-S/2", "image_size": 64, "dtype": "float32",
                   "overrides": {"model.name": "", "model.hidden_size": 32, "model.depth": 2, "model.num_heads": 2,
                                 "model.input_size": 8, "model.num_classes": 10}}


# A 1-block pixel-space DiT on 32x32 synthetic images with 8x8 patches: its run takes seconds.
TINY_RUN = dict(model=dict(hidden_size=32, depth=1, num_heads=2, num_classes=4, mlp_ratio=4.0, patch_size=8),
                data=dict(num_train=64),
                train=dict(batch_size=8, log_every=1, checkpoint_every=2, max_to_keep=3, steps=3),
                evals=dict(samples=dict(per_class=1, num_classes=2, respacing="2"), class_consistency=dict(every=-1)))


def tiny_run_config(**sections: dict[str, Any]):
    """The demo config made tiny (``TINY_RUN``), with ``sections`` (e.g. ``train={...}``) updated on top."""
    from configs import default

    c = default.get_config()
    for field, value in [*flat_fields(TINY_RUN).items(), *flat_fields(sections).items()]:
        set_field(c, field, value)
    return c


def latent_config(latents_dir: str):
    """The demo recipe on 8x8x4 latents (3 classes) with a 1-block DiT, 6 steps; no evaluations."""
    from configs import default

    c = default.get_config()
    c.model.update(hidden_size=32, depth=1, num_heads=2, patch_size=2, input_size=8, in_channels=4, num_classes=3,
                   guidance="official")
    c.data.update(source="latents", latents_dir=latents_dir)
    c.train.update(steps=6, batch_size=8, log_every=3)
    c.evals.samples.every = -1
    c.evals.class_consistency.every = -1
    return c


# A tiny latent-space DiT (4 channels, as the SD VAE's latents) with label dropout (a null label).
TINY_LATENT_DIT = dict(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)


def tiny_latent_dit(seed: int = 0):
    """``TINY_LATENT_DIT`` with every weight random (no zeroed output layer), so samples depend on labels and noise."""
    import jax
    from flax import nnx

    from dit_jax.models import DiT

    model = DiT(**TINY_LATENT_DIT, rngs=nnx.Rngs(seed))
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        var[...] = 0.05 * jax.random.normal(jax.random.key(1000 * seed + i), var[...].shape)
    return model


# configs/default.py shrunk on the command line: 16x16 images, a 1-block DiT, 3 classes.
TINY_FLAGS = ["--config.model.hidden_size=32", "--config.model.depth=1", "--config.model.num_heads=2",
              "--config.model.input_size=16", "--config.model.num_classes=3", "--config.data.image_size=16",
              "--config.data.num_train=128", "--config.train.log_every=2", "--config.evals.samples.respacing=3",
              "--config.evals.class_consistency.every=-1"]


def tiny_train_config():
    """The default recipe shrunk to seconds: 16x16 images, a 1-block DiT, 80 steps."""
    from configs import default

    c = default.get_config()
    c.model.update(hidden_size=32, depth=1, num_heads=2, patch_size=4, input_size=16, num_classes=4)
    c.data.update(num_train=256, image_size=16)
    c.train.update(steps=80, batch_size=16, lr=1e-3, log_every=5)
    c.evals.samples.update(per_class=2, respacing="5")
    c.evals.class_consistency.every = -1  # off
    return c


BENCHMARK_BATCH = 8
BENCHMARK_MESH = {"data": 4, "fsdp": 2, "tensor": 1}  # the 8 CPU devices that conftest.py simulates


def tiny_benchmark_config():
    """The benchmark's base recipe with a 1-block DiT on 8x8x4 inputs over the 8 simulated devices."""
    from dit_jax.recipes import base_config

    c = base_config()
    c.model.name = ""
    c.model.update(patch_size=2, hidden_size=32, depth=1, num_heads=2, input_size=8, num_classes=10)
    c.train.batch_size = BENCHMARK_BATCH
    c.mesh.update(BENCHMARK_MESH)
    return c
