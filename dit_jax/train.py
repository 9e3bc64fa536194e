"""Training: the paper's recipe as one jitted step, and ``train_and_evaluate`` around it.

The hot step is a pure function of the split model state (``nnx.split``/``nnx.merge``):
``train_step(state, batch) -> (state, metrics)`` with params, AdamW state, EMA params, step
and RNG in one ``TrainState`` pytree.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from dit_jax import classifier, diffusion as gd, input_pipeline, sample, synthetic
from dit_jax.image_grid import save_grid
from dit_jax.models import DiT, count_params, create_model, precision_options


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: a pytree, so it jits, shards and checkpoints as one."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State
    rng: jax.Array


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> DiT:
    """The DiT that ``config.model`` describes (a paper model by name, or explicit sizes)."""
    m = config.model
    common = dict(input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                  mlp_ratio=m.mlp_ratio, class_dropout_prob=m.class_dropout_prob, learn_sigma=m.learn_sigma,
                  block_type=m.block_type, guidance=m.guidance,
                  **precision_options(config.dtype, config.remat))
    if m.name:
        return create_model(m.name, rngs=rngs, **common)
    return DiT(patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth, num_heads=m.num_heads,
               rngs=rngs, **common)


def build_diffusion(config: ml_collections.ConfigDict, respacing: str = "") -> gd.Diffusion:
    """The training chain (``respacing=""``) or a respaced sampling chain."""
    return gd.create_diffusion(respacing, noise_schedule=config.diffusion.noise_schedule,
                               learn_sigma=config.model.learn_sigma, diffusion_steps=config.diffusion.steps)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with a constant learning rate and no warmup (the paper's optimiser)."""
    return optax.adamw(config.train.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.train.weight_decay)


def create_train_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State, TrainState]:
    """Initialise the model, optimiser and EMA; returns (graphdef, fixed state, train state)."""
    key = jax.random.key(config.seed)
    init_key, state_key = jax.random.split(key)
    model = build_model(config, rngs=nnx.Rngs(init_key))
    graphdef, params, fixed = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(config).init(params),
                       ema_params=jax.tree.map(jnp.copy, params), rng=state_key)
    return graphdef, fixed, state


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, fixed: nnx.State,
               diffusion: gd.Diffusion, tx: optax.GradientTransformation,
               ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step: uniform timesteps, hybrid loss (mse + vb), label dropout, AdamW, EMA."""
    step_key = jax.random.fold_in(state.rng, state.step)
    t_key, noise_key, drop_key = jax.random.split(step_key, 3)
    x, y = batch["image"], batch["label"]
    t = jax.random.randint(t_key, (x.shape[0],), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_key, x.shape, x.dtype)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, fixed)
        model_fn = lambda x_t, tt: model(x_t, tt, y, dropout_key=drop_key)
        terms = gd.training_losses(diffusion, model_fn, x, t, noise)
        return terms["loss"].mean(), {k: v.mean() for k, v in terms.items()}

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
    return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, fixed: nnx.State,
                    diffusion: gd.Diffusion) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``train_step`` bound to this run's model, chain and optimiser, jitted with the state donated."""
    step = functools.partial(train_step, graphdef=graphdef, fixed=fixed, diffusion=diffusion,
                             tx=make_optimizer(config), ema_decay=config.train.ema_decay)
    return jax.jit(step, donate_argnums=0)


def _check_config(config: ml_collections.ConfigDict) -> None:
    problems = []
    if config.train.steps < 1 or config.train.batch_size < 1:
        problems.append(f"train.steps and train.batch_size must be >= 1 (got {config.train.steps}, {config.train.batch_size})")
    if not 0.0 <= config.train.ema_decay < 1.0:
        problems.append(f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    if config.data.source == "synthetic" and config.data.image_size != config.model.input_size:
        problems.append(f"data.image_size ({config.data.image_size}) must equal model.input_size "
                        f"({config.model.input_size}) for pixel-space synthetic data")
    if config.sample.sampler not in sample.SAMPLERS:
        problems.append(f"sample.sampler {config.sample.sampler!r} is not one of {sample.SAMPLERS}")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train ``config`` in ``workdir``, then sample a guided grid from the EMA weights.

    Writes ``samples.png`` (one row per class), ``metrics.jsonl`` and ``summary.json``; with
    ``eval.class_consistency`` a classifier trained on the synthetic data scores the samples.
    """
    _check_config(config)
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    source = input_pipeline.create_source(config)
    batches = input_pipeline.make_train_iterator(source, batch_size=config.train.batch_size, seed=config.seed)
    graphdef, fixed, state = create_train_state(config)
    num_params = count_params(nnx.merge(graphdef, state.params, fixed))
    logging.info("model: %s, %d trainable parameters", config.model.name or "custom DiT", num_params)
    diffusion = build_diffusion(config)
    step_fn = make_train_step(config, graphdef, fixed, diffusion)

    history = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    window_start, window_steps, window_sums = time.time(), 0, None
    with open(metrics_path, "w") as metrics_file:
        for step in range(1, config.train.steps + 1):
            state, metrics = step_fn(state, next(batches))
            # Sum on device; one transfer per log line, averaged over the steps since the last.
            window_sums = metrics if window_sums is None else jax.tree.map(jnp.add, window_sums, metrics)
            window_steps += 1
            if step % config.train.log_every == 0 or step == config.train.steps:
                metrics = {k: float(v) / window_steps for k, v in jax.device_get(window_sums).items()}
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"non-finite loss {metrics['loss']} by step {step}; lower train.lr "
                                             "or check the data")
                elapsed = time.time() - window_start
                metrics.update(step=step, steps_per_sec=window_steps / elapsed,
                               images_per_sec=window_steps * config.train.batch_size / elapsed)
                logging.info("step %d: loss %.4f (mse %.4f, vb %.4f), grad norm %.3f, %.2f steps/s", step,
                             metrics["loss"], metrics["mse"], metrics.get("vb", 0.0), metrics["grad_norm"],
                             metrics["steps_per_sec"])
                metrics_file.write(json.dumps(metrics) + "\n")
                metrics_file.flush()
                history.append(metrics)
                window_start, window_steps, window_sums = time.time(), 0, None
    train_seconds = time.time() - start

    summary: dict[str, Any] = {
        "model": config.model.name or "custom",
        "trainable_params": int(num_params),
        "steps": config.train.steps,
        "batch_size": config.train.batch_size,
        "first_loss": history[0]["loss"],  # mean over the first log window
        "final_loss": history[-1]["loss"],  # mean over the last log window
        "train_seconds": train_seconds,
        "steps_per_sec": config.train.steps / train_seconds,
    }
    summary.update(_sample_and_score(config, graphdef, fixed, state, workdir))
    summary["total_seconds"] = time.time() - start
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("summary: %s", json.dumps(summary))
    return summary


def _sample_and_score(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, fixed: nnx.State,
                      state: TrainState, workdir: str) -> dict[str, Any]:
    """Guided EMA samples of each class -> samples.png; optionally their class consistency."""
    num_classes = min(config.sample.num_classes, config.model.num_classes)
    labels = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), config.sample.per_class)
    ema_model = nnx.merge(graphdef, state.ema_params, fixed)
    t0 = time.time()
    samples = sample.generate(ema_model, build_diffusion(config, config.sample.respacing), labels,
                              jax.random.key(config.seed + 1), cfg_scale=config.sample.cfg_scale,
                              sampler=config.sample.sampler)
    samples = np.asarray(jnp.clip(samples, -1, 1))
    out: dict[str, Any] = {"sample_seconds": time.time() - t0, "samples_png": "samples.png",
                           "sampler": f"{config.sample.sampler} {config.sample.respacing} steps, "
                                      f"guidance {config.sample.cfg_scale}"}
    if config.data.source == "synthetic":
        rows = synthetic.from_model_range(samples).reshape(num_classes, config.sample.per_class, *samples.shape[1:])
        save_grid(os.path.join(workdir, "samples.png"), rows)
    if config.eval.class_consistency:
        out.update(_class_consistency(config, samples, np.asarray(labels)))
    return out


def _class_consistency(config: ml_collections.ConfigDict, samples: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Train a classifier on fresh synthetic data; its accuracy on held-out data and on the samples."""
    t0 = time.time()
    n, k, size = config.eval.classifier_examples, config.model.num_classes, config.data.image_size
    images, targets = synthetic.generate(n, num_classes=k, image_size=size, seed=config.seed + 1000)
    judge = classifier.train_classifier(synthetic.to_model_range(images), targets, num_classes=k, seed=config.seed)
    held_images, held_labels = synthetic.generate(config.eval.heldout_examples, num_classes=k, image_size=size,
                                                  seed=config.seed + 2000)
    predicted = classifier.predict(judge, samples)
    per_class = [float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)]
    return {
        "classifier_heldout_accuracy": classifier.accuracy(judge, synthetic.to_model_range(held_images), held_labels),
        "class_consistency": float(np.mean(predicted == labels)),
        "class_consistency_per_class": per_class,
        "chance": 1.0 / k,
        "classifier_seconds": time.time() - t0,
    }
