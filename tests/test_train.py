"""The trainer: a short run learns, the step is pure, config errors are clear, main runs end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax import flops, optimizer, train, train_state
from tests.processes import free_port, main_command, run_processes
from tests.run_files import read_log, tensorboard_steps
from tests.tiny_models import TINY_FLAGS, set_field, tiny_train_config as tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_short_run_loss_falls_and_writes_outputs(tmp_path):
    config = tiny_config()
    config.train.profile_steps = 2
    config.evals.samples.every = 40
    summary = train.train_and_evaluate(config, str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    history = [h for h in lines if "eval" not in h]
    assert [h["step"] for h in history] == list(range(5, 81, 5))
    # One line per evaluation (every 40 steps and at the last), after the training line of its step.
    evals = [(i, h["step"]) for i, h in enumerate(lines) if h.get("eval") == "samples"]
    assert [step for _, step in evals] == [40, 80] and all(lines[i - 1]["step"] == step for i, step in evals)
    losses = np.array([h["loss"] for h in history])
    assert np.all(np.isfinite(losses))
    # Zero-initialised output predicts eps = 0 (mse ~ 1); training must cut that well down.
    assert losses[:2].mean() > 0.5
    assert losses[-4:].mean() < 0.6 * losses[:2].mean()
    assert summary["final_loss"] == history[-1]["loss"] and summary["final_loss_steps"] == [76, 80]
    assert summary["first_loss"] == history[0]["loss"] and summary["first_loss_steps"] == [1, 5]
    assert (tmp_path / "samples.png").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == 80 and saved["evals"]["samples"]["png"] == "samples.png"
    # Every field of the config, as JSON (the console names only the config file and the overrides).
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))
    # TensorBoard: every metric at every log step, and the EMA sample grids (also PNGs in the workdir).
    tags = tensorboard_steps(tmp_path)
    for tag in ("loss", "mse", "vb", "grad_norm", "learning_rate", "steps_per_sec", "images_per_sec"):
        assert tags[tag] == list(range(5, 81, 5)), tag
    assert tags["samples/grid"] == [40, 80]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_00000040.png", "step_00000080.png"]
    assert list((tmp_path / "plugins" / "profile").glob("*/*.xplane.pb"))  # the profile of steps 10-12


def test_mfu_is_logged_where_the_device_peak_is_known(tmp_path, monkeypatch):
    """A CPU has no peak in the table; give it one and each log line carries the step's utilisation."""
    peak = 1e12
    monkeypatch.setattr(flops, "peak_flops_per_device", lambda device, dtype=None: peak)
    config = tiny_config()
    config.train.update(steps=10, log_every=5)
    config.evals.samples.every = -1  # training lines only
    train.train_and_evaluate(config, str(tmp_path))
    history = read_log(tmp_path)
    # The default mesh spans every device (8 simulated ones in the tests): the peak is theirs together.
    step_flops = [h["mfu"] * peak * jax.device_count() / h["steps_per_sec"] for h in history]
    assert step_flops[0] == pytest.approx(step_flops[1], rel=1e-6)  # the same step every time
    # Forward, backward (about 2x) and the optimiser: 2.5x-4x the forward's flops over the batch.
    graphdef, fixed, state = train_state.create_train_state(config)
    m = config.model
    x = jnp.zeros((config.train.batch_size, m.input_size, m.input_size, m.in_channels))
    y = jnp.zeros((config.train.batch_size,), jnp.int32)
    forward = flops.lowered_flops(lambda p, x, t, y: nnx.merge(graphdef, p, fixed)(x, t, y), state.params, x, y, y)
    assert 2.5 * forward < step_flops[0] < 4 * forward


def test_a_cudnn_attention_step_is_counted_as_with_xla_attention(monkeypatch):
    """cuDNN's kernel lowers only for GPUs; the flop count (lowered for the CPU) uses XLA's, the same maths."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # passes the config check; nothing runs here
    c = tiny_config()
    c.dtype = "bfloat16"
    diffusion = train.build_diffusion(c)
    graphdef, fixed, state = train_state.create_train_state(c)
    expected = train.step_flops(c, graphdef, fixed, diffusion, state)
    c.attention = "cudnn"
    graphdef, fixed, state = train_state.create_train_state(c)
    assert "cudnn" in repr(graphdef)
    assert train.step_flops(c, graphdef, fixed, diffusion, state) == expected > 0


def test_train_step_is_a_pure_function_of_the_state():
    c = tiny_config()
    c.train.ema_debias = False
    graphdef, fixed, state = train_state.create_train_state(c)
    step = train.make_train_step(c, graphdef, fixed, train.build_diffusion(c))
    batch = {"image": jnp.zeros((16, 16, 16, 3)), "label": jnp.arange(16, dtype=jnp.int32) % 4}
    copy = jax.tree.map(jnp.copy, state)
    s1, m1 = step(state, batch)
    s2, m2 = step(copy, batch)
    assert float(m1["loss"]) == float(m2["loss"])
    assert int(s1.step) == 1
    leaves1, leaves2 = jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)
    assert all(np.array_equal(a, b) for a, b in zip(leaves1, leaves2))
    # EMA moved towards the new params by (1 - decay) of the update.
    _, _, init = train_state.create_train_state(c)
    p0, p1, e1 = (jax.tree.leaves(x)[0] for x in (init.params, s1.params, s1.ema_params))
    np.testing.assert_allclose(e1, p0 + (1 - c.train.ema_decay) * (p1 - p0), rtol=1e-5, atol=1e-7)


def test_debiased_ema_is_the_bias_corrected_average_of_the_trained_weights():
    c = tiny_config()
    c.train.update(ema_decay=0.9, ema_debias=True)
    graphdef, fixed, state = train_state.create_train_state(c)
    step = train.make_train_step(c, graphdef, fixed, train.build_diffusion(c))
    batch = {"image": jnp.full((16, 16, 16, 3), 0.3), "label": jnp.arange(16, dtype=jnp.int32) % 4}
    s1, _ = step(state, batch)
    p1 = [np.asarray(x) for x in jax.tree.leaves(s1.params)]
    # The first update replaces the initial weights entirely...
    for p, e in zip(p1, jax.tree.leaves(s1.ema_params)):
        np.testing.assert_array_equal(e, p)
    s2, _ = step(s1, batch)
    # ...and later ones weight the trained weights decay**(n - i), normalised: (0.9 p1 + p2) / 1.9.
    for a, b, e in zip(p1, jax.tree.leaves(s2.params), jax.tree.leaves(s2.ema_params)):
        np.testing.assert_allclose(e, (0.9 * a + np.asarray(b)) / 1.9, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decay", [0.0, 0.9, 0.999])
def test_debiased_ema_schedule_matches_the_closed_form(decay):
    c = tiny_config()
    c.train.update(ema_decay=decay, ema_debias=True)
    schedule = optimizer.ema_decay_schedule(c)
    values = np.random.default_rng(0).standard_normal(300)
    decays = np.asarray(jax.jit(schedule)(jnp.arange(len(values), dtype=jnp.int32)))  # one program, not 300
    ema = 123.0  # the initial weights: must not survive
    for d, v in zip(decays.astype(np.float64), values):
        ema = d * ema + (1 - d) * v
    weights = decay ** np.arange(len(values))[::-1]
    np.testing.assert_allclose(ema, np.sum(weights * values) / np.sum(weights), rtol=1e-4)
    c.train.ema_debias = False
    assert float(optimizer.ema_decay_schedule(c)(jnp.int32(5))) == pytest.approx(decay)


@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, {0: 1e-3, 40: 1e-3, 80: 1e-3}),          # the paper: constant, no warmup
    ("constant", 20, {0: 0.0, 10: 5e-4, 20: 1e-3, 80: 1e-3}),
    ("cosine", 0, {0: 1e-3, 40: 5e-4, 80: 0.0}),
    ("cosine", 20, {0: 0.0, 10: 5e-4, 20: 1e-3, 50: 5e-4, 80: 0.0}),
])
def test_learning_rate_schedules(schedule, warmup, expected):
    c = tiny_config()
    c.train.update(lr_schedule=schedule, warmup_steps=warmup)
    lr = optimizer.learning_rate_schedule(c)
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, abs=1e-9), (schedule, warmup, step)


@pytest.mark.parametrize("field, value, message", [
    ("train.steps", 0, "train.steps"),
    ("train.ema_decay", 1.0, "ema_decay"),
    ("data.image_size", 32, "must equal model.input_size"),
    ("evals.samples.sampler", "euler", "evals.samples: sampler 'euler' is not one of"),
    ("evals.samples.respacing", "xyz", "evals.samples: respacing 'xyz'"),
    ("evals.samples.per_class", 0, "evals.samples: per_class and num_classes must be >= 1"),
    ("evals.samples.every", -2, "evals.samples.every must be an integer"),
    ("evals.samples.type", "nope", r"evals.samples.type='nope' is not an evaluator: use one of \[.*'grid'"),
    ("train.lr_schedule", "linear", "lr_schedule"),
    ("train.warmup_steps", 80, "warmup_steps"),
    ("data.source", "imagenet", "data.source='imagenet' is not available"),
    ("model.block_type", "film", "block_type"),
    ("train.checkpoint_every", 0, "checkpoint_every"),
    ("train.lr", -1.0, r"train.lr must be in \(0, 1\], got -1.0"),
    ("train.lr", float("nan"), r"train.lr must be in \(0, 1\], got nan"),
    ("train.lr", float("inf"), r"train.lr must be in \(0, 1\], got inf"),
    ("train.lr", 1e30, r"train.lr must be in \(0, 1\], got 1e\+30: AdamW moves every weight by up to about lr"),
    ("train.weight_decay", -0.5, "train.weight_decay must be a finite number >= 0"),
])
def test_bad_config_values_are_named(tmp_path, field, value, message):
    c = tiny_config()
    set_field(c, field, value)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(c, str(tmp_path))
    # A failed run leaves nothing behind that looks like a result.
    assert not (tmp_path / "summary.json").exists()


# The demo config shrunk to seconds for runs of ``dit_jax.main``: a 1-block DiT on 16x16 images.
def run_two_processes(workdir, steps: int) -> None:
    """``dit_jax.main`` on the tiny config as 2 processes of 4 CPU devices each (a 2-host run)."""
    cmd = main_command(workdir, *TINY_FLAGS, f"--config.train.steps={steps}", "--config.train.batch_size=16",
                       "--config.train.checkpoint_every=4", "--config.evals.samples.per_class=2",
                       f"--coordinator_address=localhost:{free_port()}", "--num_processes=2")
    run_processes([[*cmd, f"--process_id={i}"] for i in range(2)], timeout=600)


@pytest.mark.slow  # three 2-process runs; test_sharding's 2-process test and the 1-process resume tests stay fast
def test_a_two_process_run_resumes_exactly_and_only_process_0_writes(tmp_path):
    """Two hosts (simulated): each feeds its half of the batch, both write their shards of each
    checkpoint, and rerunning the command resumes: the losses are those of an uninterrupted run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_two_processes(straight, 8)
    run_two_processes(resumed, 4)
    run_two_processes(resumed, 8)
    history = read_log(straight)
    assert [h["step"] for h in history] == [2, 4, 6, 8]  # one writer: no step logged twice
    assert [h["step"] for h in read_log(straight, evals=True)] == [8]
    resumed_history = read_log(resumed)
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in history]
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 4
    assert len(list(straight.glob("events.out.tfevents.*"))) == 1 and (straight / "samples.png").exists()
    step = straight / "checkpoints" / "8"
    assert sorted(p.name for p in (step / "data").glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(p.name for p in (step / "state").glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]


def test_main_runs_with_flag_overrides_and_prints_its_report_last(tmp_path):
    """The README's first command's path, end to end and fast: ``dit_jax.main`` trains, evaluates and prints its last
    lines (``run_report``) on stdout from the run's summary."""
    cmd = main_command(tmp_path, *TINY_FLAGS, "--config.train.steps=4", "--config.train.batch_size=8",
                       "--config.evals.samples.per_class=1", "--config.evals.samples.sampler=ddim")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["batch_size"] == 8
    assert "ddim 3 steps" in summary["evals"]["samples"]["sampler"]
    finished, loss, grid, files = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"finished: 4 steps in \d+:\d\d:\d\d in all: training \d+:\d\d:\d\d \(4 steps at [0-9.]+ "
                        r"steps/s, compilation included\), evaluation \d+:\d\d:\d\d, the rest \(start-up, data, "
                        r"checkpoints\) \d+:\d\d:\d\d", finished), finished
    assert loss == (f"training loss (mean of a log window): {summary['first_loss']:.4f} over steps 1-2, then "
                    f"{summary['final_loss']:.4f} over steps 3-4")
    assert grid == f"sample grid {tmp_path / 'samples.png'} (a row per class; ddim 3 steps, guidance 4.0)"
    assert files == (f"every figure: {tmp_path / 'summary.json'}; each log window and evaluation: "
                     f"{tmp_path / 'metrics.jsonl'}")

    bad = subprocess.run(cmd + ["--config.train.no_such_field=1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == ("error: --config.train.no_such_field: the config has no field "
                                                   "'no_such_field' (see dit_jax/recipes.py for every field and "
                                                   "its meaning)")


@pytest.mark.parametrize("flags, message", [
    (["--config", "configs/no_such.py"], "error: config file configs/no_such.py does not exist"),
    (["--config", "configs/default.py", "--config.model.input_size=30", "--config.data.image_size=30"],
     "error: invalid DiT config: input_size 30 must be a multiple of patch_size 4"),
])
def test_a_user_error_is_one_line_and_status_2(tmp_path, flags, message):
    cmd = [sys.executable, "-m", "dit_jax.main", *flags, "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "orbax" not in proc.stderr.lower()
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not list(tmp_path.iterdir())  # nothing written
