"""The training recipe's optimiser and EMA: AdamW with its learning-rate schedule, the EMA's decay per update,
and the checks of the ``train.*`` fields they read."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import optax

LR_SCHEDULES = ("constant", "cosine")
# The largest train.lr accepted: AdamW's step is about lr per weight, and the weights are O(0.01-0.1).
MAX_LR = 1.0


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """``train.lr`` after ``train.warmup_steps`` of linear warmup: constant (the paper) or cosine-decayed to 0."""
    t = config.train
    if t.lr_schedule == "cosine":
        schedule = optax.cosine_decay_schedule(t.lr, t.steps - t.warmup_steps)
    else:
        schedule = optax.constant_schedule(t.lr)
    if not t.warmup_steps:
        return schedule
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps), schedule], [t.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (the paper's optimiser: lr 1e-4, constant, no warmup, no weight decay by default)."""
    return optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=config.train.weight_decay)


def ema_decay_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """EMA decay of each update: ``train.ema_decay`` (the paper), or with ``train.ema_debias`` bias-corrected.

    The EMA starts as a copy of the initial weights, and after n updates still holds decay**n of them
    (0.9999**8000: 45% of the average after 8,000 steps): harmless in a 400k-step run; in a short
    one their zeroed output layers shrink the predicted noise (the demo at 0.9995: near-black
    samples). Debiased, update n uses decay * (1 - decay**(n-1)) / (1 - decay**n), which makes the
    EMA exactly the bias-corrected average sum_i decay**(n-i) (1 - decay) params_i / (1 - decay**n)
    of the trained weights (Adam's correction of its moments), so a short run can use a long horizon.
    """
    decay = config.train.ema_decay
    if not config.train.ema_debias:
        return optax.constant_schedule(decay)

    def debiased(step: jax.Array) -> jax.Array:
        return decay * (1.0 - decay ** step) / (1.0 - decay ** (step + 1))
    return debiased


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
    """What is wrong with the optimiser's and EMA's ``train.*`` fields (nothing: ``[]``)."""
    problems = []
    t = config.train
    float32_max = float(np.finfo(np.float32).max)  # the step computes in float32: 1e39 is inf there
    if not 0 < t.lr <= MAX_LR:
        problems.append(f"train.lr must be in (0, {MAX_LR:g}], got {t.lr}: AdamW moves every weight by up to about lr "
                        "per step, so a larger one blows the weights up (the paper: 1e-4)")
    if not 0 <= t.weight_decay <= float32_max:
        problems.append(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
    if t.lr_schedule not in LR_SCHEDULES:
        problems.append(f"train.lr_schedule {t.lr_schedule!r} is not one of {LR_SCHEDULES}")
    if not 0 <= t.warmup_steps < t.steps:
        problems.append(f"train.warmup_steps must be in [0, train.steps), got {t.warmup_steps}")
    if not 0.0 <= t.ema_decay < 1.0:
        problems.append(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    return problems
