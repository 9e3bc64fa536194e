"""Checkpoints: exact resume after SIGKILL and SIGTERM, corrupt-latest fallback, wrong-model refusal, NaN stop."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import default
from dit_jax import checkpointing, input_pipeline, locking, optimizer, sharding, stop_signals, train, train_state
from tests.processes import main_command as main_with_flags
from tests.run_files import read_log, tensorboard_steps
from tests.tiny_models import flat_fields, set_field

ROOT = Path(__file__).resolve().parents[1]
# A 1-block DiT on 32x32 synthetic images with 8x8 patches: steps take milliseconds. MLP ratio 4: its
# fc1 kernel (32 x 128) is just large enough for FSDP to split (sharding.FSDP_MIN_SIZE).
TINY = dict(model=dict(hidden_size=32, depth=1, num_heads=2, num_classes=4, mlp_ratio=4.0, patch_size=8),
            data=dict(num_train=256),
            train=dict(batch_size=16, log_every=1, checkpoint_every=10, max_to_keep=3),
            evals=dict(samples=dict(per_class=1, num_classes=2, respacing="2"), class_consistency=dict(every=-1)))


CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
    """A persistent compilation cache for this module: its runs (and subprocesses) compile the same tiny step."""
    values = (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)
    saved = [getattr(jax.config, name) for name in CACHE_OPTIONS]
    for name, value in zip(CACHE_OPTIONS, values):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield {name.upper(): str(value) for name, value in zip(CACHE_OPTIONS, values)}
    for name, value in zip(CACHE_OPTIONS, saved):
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def tiny_config(steps: int, **train_fields):
    c = default.get_config()
    for field, value in flat_fields(TINY).items():
        set_field(c, field, value)
    c.train.update(steps=steps, **train_fields)
    return c


def restore_step(config, workdir: Path, step: int) -> train_state.TrainState:
    """The ``TrainState`` saved at ``step`` in ``workdir``."""
    _, _, state = train_state.create_train_state(config)
    manager = checkpointing.create_manager(str(workdir / "checkpoints"), every_steps=1, max_to_keep=10)
    try:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    finally:
        manager.close()


def assert_states_equal(a: train_state.TrainState, b: train_state.TrainState) -> None:
    leaves_a, leaves_b = jax.tree.leaves(jax.random.key_data(a.rng)), jax.tree.leaves(jax.random.key_data(b.rng))
    leaves_a += jax.tree.leaves(a.replace(rng=0))
    leaves_b += jax.tree.leaves(b.replace(rng=0))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(workdir)}


def committed_steps(workdir: Path) -> list[int]:
    """Step directories Orbax has committed (it renames a finished temporary directory to the step number)."""
    path = workdir / "checkpoints"
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


STEPS = 80


def main_command(workdir: Path) -> list[str]:
    overrides = [f"--config.{field}={v}" for field, v in flat_fields(TINY).items()]
    return main_with_flags(workdir, f"--config.train.steps={STEPS}", *overrides)


def start_and_signal_after_checkpoint(workdir: Path, env: dict, sig: int, after_step: int) -> tuple[int, str]:
    """Run main; once a checkpoint newer than ``after_step`` is committed, send ``sig``; (return code, stderr)."""
    proc = subprocess.Popen(main_command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not any(s > after_step for s in committed_steps(workdir)) and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint was committed within 300 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


def test_ctrl_c_checkpoints_its_step_and_the_rerun_matches_an_uninterrupted_run(tmp_path, monkeypatch, caplog):
    """In one process (the fast sibling of the subprocess test below): Ctrl-C during step 3 checkpoints step 3
    and stops; rerunning resumes there and ends with the losses and state of an uninterrupted run, bit for bit."""
    steps = 6
    config = tiny_config(steps)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    train.train_and_evaluate(config, str(reference))

    global_batch, batches_placed = sharding.global_batch, []

    def ctrl_c_during_step_3(*args, **kwargs):
        batches_placed.append(None)
        if len(batches_placed) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler takes it: a stop request
        return global_batch(*args, **kwargs)

    monkeypatch.setattr(sharding, "global_batch", ctrl_c_during_step_3)
    with caplog.at_level(logging.WARNING):
        assert train.train_and_evaluate(config, str(interrupted)) == {"preempted_at_step": 3,
                                                                       "stop_signal": signal.SIGINT}
    assert committed_steps(interrupted) == [3] and not (interrupted / "summary.json").exists()
    assert "Ctrl-C: stopped at step 3 after checkpointing it; rerun the same command to resume" in caplog.text

    monkeypatch.setattr(sharding, "global_batch", global_batch)
    assert train.train_and_evaluate(config, str(interrupted))["resumed_from_step"] == 3
    assert losses(interrupted) == losses(reference)
    assert sorted(losses(reference)) == list(range(1, steps + 1))
    assert_states_equal(restore_step(config, interrupted, steps), restore_step(config, reference, steps))


@pytest.mark.slow  # four runs in subprocesses; the in-process Ctrl-C test above is its fast sibling
def test_sigkill_sigterm_and_ctrl_c_then_rerun_match_an_uninterrupted_run(tmp_path, compile_once):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    env = {**os.environ, **compile_once}
    train.train_and_evaluate(tiny_config(STEPS), str(reference))

    # SIGKILL: no chance to clean up; whatever is committed must be enough to resume.
    code, stderr = start_and_signal_after_checkpoint(interrupted, env, signal.SIGKILL, after_step=0)
    assert code == -signal.SIGKILL, stderr[-3000:]
    assert not (interrupted / "summary.json").exists()
    killed_at = max(committed_steps(interrupted))
    assert killed_at < STEPS

    # SIGTERM (a preemption notice): checkpoint the current step, exit 143.
    code, stderr = start_and_signal_after_checkpoint(interrupted, env, signal.SIGTERM, after_step=killed_at)
    assert code == 143, stderr[-3000:]
    assert f"resumed from step {killed_at}" in stderr
    assert "taking over the lock" in stderr and "no longer running" in stderr  # the killed run's lock
    stopped_at = max(committed_steps(interrupted))
    assert killed_at < stopped_at < STEPS
    assert f"SIGTERM: stopped at step {stopped_at}" in stderr

    # Ctrl-C: the same, exit 130 with one line and no traceback.
    code, stderr = start_and_signal_after_checkpoint(interrupted, env, signal.SIGINT, after_step=stopped_at)
    assert code == 130, stderr[-3000:]
    assert f"resumed from step {stopped_at}" in stderr
    interrupted_at = max(committed_steps(interrupted))
    assert stopped_at < interrupted_at < STEPS
    assert re.search(rf"\] Ctrl-C: stopped at step {interrupted_at} after checkpointing it; rerun the same command to "
                     r"resume\n$", stderr), stderr[-3000:]  # the last line
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr

    proc = subprocess.run(main_command(interrupted), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {interrupted_at}" in proc.stderr
    # The console: one line per log window with one steps/s figure, and no library INFO chatter (Orbax's ~40
    # lines per checkpoint, CLU's progress notes).
    lines = [line for line in proc.stderr.splitlines() if re.match(r"[IWEF]\d{4} ", line)]
    progress = [line for line in lines if "steps/s" in line]
    assert [int(re.search(r"\] step (\d+)/80: loss [0-9.]+, [0-9.e+]+ steps/s, [0-9.e+]+ img/s, "
                          r"\d+:\d\d:\d\d left$", line)[1]) for line in progress] == list(range(interrupted_at + 1, 81))
    assert all(line.count("steps/s") == 1 for line in progress)
    assert not [line for line in lines if line.startswith("I") and not re.search(r" (main|train)\.py:\d+\]", line)]
    assert json.loads((interrupted / "summary.json").read_text())["steps_per_sec"] > 0  # after a resume
    # Last, on stdout: the wall time, the first and last loss windows and the final evaluation, in words.
    report = proc.stdout.splitlines()
    assert re.fullmatch(rf"finished: 80 steps \(resumed from step {interrupted_at}\) in \d+:\d\d:\d\d in all: training "
                        rf"\d+:\d\d:\d\d \({80 - interrupted_at} steps at [0-9.e+]+ steps/s, compilation included\), "
                        r"evaluation \d+:\d\d:\d\d, the rest \(start-up, data, checkpoints\) \d+:\d\d:\d\d", report[0])
    assert re.fullmatch(r"training loss \(mean of a log window\): [0-9.]+ over steps 1-1, then [0-9.]+ over steps 80-80",
                        report[1])
    assert report[2:] == [f"sample grid {interrupted / 'samples.png'} (a row per class; ddpm 2 steps, guidance 4.0)",
                          f"every figure: {interrupted / 'summary.json'}; each log window and evaluation: "
                          f"{interrupted / 'metrics.jsonl'}"]

    # Same losses at every step, bit for bit, and the same final state.
    assert losses(interrupted) == losses(reference)
    assert sorted(losses(reference)) == list(range(1, STEPS + 1))
    config = tiny_config(STEPS)
    assert_states_equal(restore_step(config, interrupted, STEPS), restore_step(config, reference, STEPS))


def test_a_second_ctrl_c_quits_at_once(monkeypatch, capsys):
    """The first Ctrl-C asks the loop to checkpoint and stop; a second one exits at once with status 130
    (a save in progress stays uncommitted: Orbax commits a step only when it is complete)."""
    exits, before = [], signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's `&`
    monkeypatch.setattr(os, "_exit", exits.append)
    with stop_signals.stop_on_signals() as request:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signum == signal.SIGINT and not exits
        os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130]
    assert "Ctrl-C again: quitting at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_second_run_on_a_busy_workdir_refuses_at_once_naming_the_first(tmp_path, compile_once):
    """Two real runs on one workdir: the second stops before touching it; once the first is killed,
    the lock it left is taken over by the next run."""
    env = {**os.environ, **compile_once}
    first = subprocess.Popen(main_command(tmp_path) + ["--config.train.steps=100000"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (tmp_path / locking.LOCK_FILE).exists():
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        started = time.time()
        with pytest.raises(locking.LockHeldError, match=rf"in use by training run on host .*, pid {first.pid}, "
                                                        r"started 20\d\d-\d\d-\d\d .*dit_jax.main"):
            train.train_and_evaluate(tiny_config(2), str(tmp_path))
        assert time.time() - started < 5
        assert first.poll() is None  # undisturbed
    finally:
        first.kill()
        first.wait()
    summary = train.train_and_evaluate(tiny_config(2), str(tmp_path))
    assert summary["steps"] == 2
    assert not (tmp_path / locking.LOCK_FILE).exists()


def flip_bytes_in_the_middle(step_dir: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of each of the step's array files (a damaged disk or copy).

    Every file, not only the largest: one file alone may hold only data that OCDBT no longer references.
    """
    for path in (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
        path.write_bytes(bytes(data))


def test_corrupt_latest_checkpoints_fall_back_to_the_previous_intact_one(tmp_path, caplog):
    config = tiny_config(30, checkpoint_every=10)
    train.train_and_evaluate(config, str(tmp_path))
    assert committed_steps(tmp_path) == [10, 20, 30]
    final = restore_step(config, tmp_path, 30)

    # Step 30 loses the second half of each of its array files (one file alone may hold only data that
    # OCDBT no longer references); step 20 gets 64 flipped bytes in the middle of each array file
    # (they fail to decode, or decode to wrong numbers that only the checksums tell); an empty step 40 looks like a killed
    # write, and a temporary directory like a write killed half-way.
    for path in (tmp_path / "checkpoints" / "30" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
    flip_bytes_in_the_middle(tmp_path / "checkpoints" / "20")
    (tmp_path / "checkpoints" / "40").mkdir()
    unfinished = tmp_path / "checkpoints" / "50.orbax-checkpoint-tmp-1234"
    (unfinished / "state").mkdir(parents=True)
    # An earlier quarantined copy of step 30 must survive the next one.
    (tmp_path / "checkpoints_corrupt" / "30").mkdir(parents=True)

    with caplog.at_level(logging.WARNING):
        summary = train.train_and_evaluate(config, str(tmp_path))
    messages = caplog.text
    assert "checkpoint step 40" in messages and "its directory is empty" in messages
    assert "checkpoint step 30" in messages and "cannot be read" in messages
    # Flipped bytes either fail to decode or decode to numbers that differ from the recorded checksums
    # (the single-bit test below pins the checksum path): never restored silently.
    step_20 = [line for line in messages.splitlines() if "checkpoint step 20 in" in line]
    assert step_20 and any("differ from the checksums recorded" in line or "cannot be read" in line
                           for line in step_20)
    assert f"{unfinished} is the unfinished write of checkpoint step 50" in messages
    # The quarantine is never pruned, and says so with its size (the last report counts all 5 kept).
    assert f"{tmp_path / 'checkpoints_corrupt'} holds 5 set-aside checkpoint step(s), " in messages
    assert summary["resumed_from_step"] == 10
    # Nothing is deleted: every unusable step, both copies of step 30 and the unfinished write are kept
    # aside, and retraining from 10 rebuilt step 30 exactly.
    assert sorted(p.name for p in (tmp_path / "checkpoints_corrupt").iterdir()) == [
        "20", "30", "30.1", "40", "50.orbax-checkpoint-tmp-1234"]
    assert committed_steps(tmp_path) == [10, 20, 30]
    assert_states_equal(restore_step(config, tmp_path, 30), final)


EMA_KERNEL = "ema_params/blocks/0/mlp/fc1/kernel"


def flip_one_ema_bit(state: train_state.TrainState) -> tuple[train_state.TrainState, train_state.TrainState]:
    """(step 2 with one EMA weight's bit flipped after its checksums were taken, as a damaged disk would return
    it; the state whose checksums it records)."""
    state2 = state.replace(step=state.step + 1)

    def flip_one_bit(path, x):
        if not jax.tree_util.keystr(path, simple=True, separator="/").startswith(EMA_KERNEL):
            return x
        x = np.array(x)
        x.view(np.uint32)[3, 5] ^= 1 << 9  # one mantissa bit: a plausible, finite weight
        return jax.numpy.asarray(x)

    return jax.tree_util.tree_map_with_path(flip_one_bit, state2), state2


def explode(state: train_state.TrainState) -> tuple[train_state.TrainState, train_state.TrainState]:
    """(step 2 with finite but absurd weights, as an older version saved lr=1e30's step 1; itself)."""
    exploded = state.replace(step=state.step + 1, params=jax.tree.map(lambda x: x * 1e30, state.params))
    assert checkpointing.fingerprint(exploded)[1]  # finite
    return exploded, exploded


@pytest.mark.parametrize("damage, message", [
    (flip_one_ema_bit, rf"checkpoint step 2 .*: 1 of its \d+ arrays differ .*\({EMA_KERNEL}/value\)"),
    (explode, r"checkpoint step 2 .*: its params have exploded \(RMS [0-9.]+e\+28, over the limit 10\)"),
])
def test_a_damaged_or_exploded_step_is_refused_and_the_previous_one_restored(tmp_path, caplog, damage, message):
    """Step 2 with one flipped bit, or with weights a diverging run left finite but absurd (not "the last good
    checkpoint"), is refused, saying why, and set aside; step 1 is restored."""
    config = tiny_config(10)
    _, _, state = train_state.create_train_state(config)
    iterator = input_pipeline.make_train_iterator(input_pipeline.create_source(config), batch_size=16, seed=0)
    manager = checkpointing.create_manager(str(tmp_path / "checkpoints"), every_steps=1, max_to_keep=3)
    try:
        checkpointing.save(manager, 1, state, iterator, config, checksums=checkpointing.fingerprint(state)[0],
                           force=True)
        saved, summed = damage(state)
        checkpointing.save(manager, 2, saved, iterator, config, checksums=checkpointing.fingerprint(summed)[0],
                           force=True)
        manager.wait_until_finished()
        with caplog.at_level(logging.WARNING):
            restored = checkpointing.restore_latest(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, state),
                                                    iterator, config, quarantine_dir=str(tmp_path / "corrupt"))
    finally:
        manager.close()
    assert re.search(message, caplog.text), caplog.text[-2000:]
    assert int(restored.step) == 0  # step 1 of the manager holds the initial state
    assert_states_equal(restored, state)
    assert [p.name for p in (tmp_path / "corrupt").iterdir()] == ["2"]


def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    """An absurd weight decay overflows float32 in the first update (infinite parameters), while that
    step's loss and gradient are still finite: the state check before the save stops it."""
    monkeypatch.setattr(optimizer, "MAX_LR", float("inf"))  # past the config check, to reach the step's own guard
    config = tiny_config(5, checkpoint_every=1, lr=30.0, weight_decay=3e38)
    with pytest.raises(FloatingPointError, match="non-finite parameters after step 1.*no checkpoint was written"):
        train.train_and_evaluate(config, str(tmp_path))
    assert committed_steps(tmp_path) == []


def test_a_full_disk_is_reported_in_one_line_naming_the_step_and_the_last_committed_one(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.decode().strip()}")

    def fill_the_disk_after_the_first_checkpoint():
        while not committed_steps(disk / "run"):
            time.sleep(0.01)
        with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()

    filler = threading.Thread(target=fill_the_disk_after_the_first_checkpoint, daemon=True)
    filler.start()
    try:
        with pytest.raises(checkpointing.CheckpointSaveError) as err:
            train.train_and_evaluate(tiny_config(10_000, checkpoint_every=2), str(disk / "run"))
        filler.join()
        committed = committed_steps(disk / "run")
        unfinished = [p.name for p in (disk / "run" / "checkpoints").iterdir() if checkpointing.TMP_MARKER in p.name]
        last_logged = max(losses(disk / "run"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    message = str(err.value)
    assert "\n" not in message
    failed, last = map(int, re.fullmatch(r"saving the checkpoint of step (\d+) \(.*\) failed: no space left on "
                                         r"device; the last committed checkpoint is step (\d+)\. Free space .*"
                                         r"rerun the same command: it resumes from the last committed step\.",
                                         message).groups())
    assert committed[-1] == last < failed
    assert last_logged <= failed + 2  # reported by the next save at the latest, not at the end of the run
    assert unfinished == [f"{failed}.orbax-checkpoint-tmp"]  # kept for the next run to report


def test_a_failed_save_is_one_line_without_orbax_tracebacks(tmp_path, monkeypatch, caplog):
    """A full disk while Orbax writes step 4 (its JSON items fail with ENOSPC): one error naming the step and the
    last committed one, and none of Orbax's own error records (each with a traceback) beside it."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_from_step_4(self, x, directory):
        if "/4.orbax-checkpoint-tmp/" in os.fspath(directory):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(directory))
        return await write(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_from_step_4)
    with caplog.at_level(logging.INFO), pytest.raises(checkpointing.CheckpointSaveError) as err:
        train.train_and_evaluate(tiny_config(10, checkpoint_every=2), str(tmp_path))
    assert re.fullmatch(r"saving the checkpoint of step 4 \(.*\) failed: no space left on device; the last committed "
                        r"checkpoint is step 2\. Free space .*", str(err.value))
    orbax_errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "/orbax/" in r.pathname]
    assert not orbax_errors, [r.getMessage()[:200] for r in orbax_errors]


def test_a_tensorstore_error_is_one_clean_line(tmp_path):
    import tensorstore as ts

    with pytest.raises(ValueError) as err:  # what TensorStore raises for a missing array of a step
        ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "gone")}}).result()
    assert "tensorstore_spec" in str(err.value)
    line = checkpointing.error_line(err.value)
    assert line == f'ValueError: NOT_FOUND: Error opening "zarr" driver: Metadata at local file "{tmp_path}/gone/.zarray" ' \
        "does not exist"
    assert checkpointing._plain_reason(str(tmp_path / "gone"), err.value) == f"a file of it is missing ({line})"


def test_no_readable_checkpoint_is_an_error_that_keeps_them(tmp_path):
    config = tiny_config(10, checkpoint_every=10)
    train.train_and_evaluate(config, str(tmp_path))
    os.remove(tmp_path / "checkpoints" / "10" / "data" / "process_0-of-1.json")
    with pytest.raises(checkpointing.NoIntactCheckpointError,
                       match=r"can be restored:\n  step 10: a file of it is missing .*\nNothing was deleted"):
        train.train_and_evaluate(config, str(tmp_path))
    assert committed_steps(tmp_path) == [10]


def test_the_logs_are_derived_data_rewound_to_the_restored_step(tmp_path, caplog):
    """A kill after step 6 was logged but before its checkpoint, with metrics.jsonl's last line half-written:
    the rerun drops the damaged line, and each step is in metrics.jsonl and TensorBoard once."""
    train.train_and_evaluate(tiny_config(6, checkpoint_every=2), str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    text = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(text[:-40])
    resumed = tiny_config(6, checkpoint_every=2, batch_size=8)
    with caplog.at_level(logging.WARNING):
        summary = train.train_and_evaluate(resumed, str(tmp_path))
    assert summary["resumed_from_step"] == 4
    assert summary["steps_per_sec"] > 0 and summary["train_seconds"] > 0  # steps 5 and 6 over their seconds
    assert "dropping its last line, which is damaged" in caplog.text
    assert "train.batch_size changes from 16 to 8 at step 4" in caplog.text and "at example 32" in caplog.text
    assert [h["step"] for h in read_log(tmp_path)] == list(range(1, 7))
    assert tensorboard_steps(tmp_path)["loss"] == list(range(1, 7))
    # A finished run whose metrics.jsonl is lost: rerunning it samples again instead of crashing.
    (tmp_path / "metrics.jsonl").unlink()
    summary = train.train_and_evaluate(resumed, str(tmp_path))
    assert summary["resumed_from_step"] == 6 and summary["first_loss"] is None
    assert summary["steps_per_sec"] is None  # no step trained in this invocation


def test_a_checkpoint_of_another_model_or_past_the_last_step_is_refused_and_kept(tmp_path):
    config = tiny_config(10, checkpoint_every=10)
    train.train_and_evaluate(config, str(tmp_path))
    metrics = (tmp_path / "metrics.jsonl").read_text()
    other = tiny_config(20, checkpoint_every=10)
    other.model.hidden_size = 64
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"another model.*model\.hidden_size: 32 -> 64"):
        train.train_and_evaluate(other, str(tmp_path))
    assert committed_steps(tmp_path) == [10]
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert int(restore_step(config, tmp_path, 10).step) == 10
    # The same model asked to stop before the checkpoint's step: an error, not a silent no-op.
    with pytest.raises(ValueError, match="at step 10, past train.steps=5"):
        train.train_and_evaluate(tiny_config(5), str(tmp_path))


def test_an_absurd_lr_is_refused_and_exploded_weights_are_never_saved(tmp_path, monkeypatch):
    """lr=1e30 is refused up front; past that check, its first update leaves finite but absurd weights
    (RMS ~1e30), which are neither saved nor named as the last good checkpoint."""
    with pytest.raises(ValueError, match=r"train.lr must be in \(0, 1\], got 1e\+30"):
        train.train_and_evaluate(tiny_config(20, checkpoint_every=1, lr=1e30), str(tmp_path))
    monkeypatch.setattr(optimizer, "MAX_LR", float("inf"))
    with pytest.raises(FloatingPointError, match=r"the params exploded after step 1 \(RMS .*, over the limit 10\); "
                                                 "stopping: no checkpoint was written"):
        train.train_and_evaluate(tiny_config(20, checkpoint_every=1, lr=1e30), str(tmp_path))
    assert committed_steps(tmp_path) == []


def test_non_finite_loss_stops_naming_the_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss goes non-finite at step 6 (an injected NaN batch): the run stops, naming step 5 as the last good
    checkpoint, which holds finite numbers."""
    real_step = train.train_step

    def nan_at_step_6(state, batch, **kwargs):
        batch = {**batch, "image": jax.numpy.where(state.step == 5, jax.numpy.nan, batch["image"])}
        return real_step(state, batch, **kwargs)

    monkeypatch.setattr(train, "train_step", nan_at_step_6)
    config = tiny_config(20, checkpoint_every=5)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 6; stopping: the last good checkpoint "
                                                 r"is step 5 in .* \(rerunning the same command resumes from it\)"):
        train.train_and_evaluate(config, str(tmp_path))
    assert committed_steps(tmp_path) == [5]
    state = restore_step(config, tmp_path, 5)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state.params, state.ema_params)))
    assert not (tmp_path / "summary.json").exists()


def test_a_checkpoint_restores_onto_a_different_mesh(tmp_path):
    assert jax.device_count() == 8  # tests/conftest.py simulates 8 CPU devices
    config = tiny_config(10, checkpoint_every=10)
    train.train_and_evaluate(config, str(tmp_path))  # mesh data=8
    on_one_device = restore_step(config, tmp_path, 10)

    # Four devices, two-way data and two-way FSDP: the large weights come back split.
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:4])
    manager = checkpointing.create_manager(str(tmp_path / "checkpoints"), every_steps=1, max_to_keep=3)
    iterator = input_pipeline.make_train_iterator(input_pipeline.create_source(config), batch_size=16, seed=0)
    try:
        on_four = checkpointing.restore_latest(manager, train_state.abstract_train_state(config, mesh), iterator,
                                               config, quarantine_dir=str(tmp_path / "unused"))
    finally:
        manager.close()
    assert_states_equal(on_four, on_one_device)
    fc1 = on_four.params["blocks"][0]["mlp"]["fc1"]["kernel"][...]
    assert fc1.sharding.mesh.devices.size == 4 and "fsdp" in fc1.sharding.spec
    assert iterator.get_state() == json.loads(
        (tmp_path / "checkpoints" / "10" / "data" / "process_0-of-1.json").read_text())

    # The run itself resumes on another layout of the devices and keeps training.
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.train.steps = 12
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["resumed_from_step"] == 10
    assert np.isfinite(summary["final_loss"])


def test_a_checkpoint_of_another_number_of_processes_resumes_at_its_step(tmp_path, caplog):
    """grain keeps one position file per process; written by 2 processes, read by 1, the input
    continues from the step count (every process reads one batch per step), so the losses are
    those of an uninterrupted run."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train.train_and_evaluate(tiny_config(20, checkpoint_every=10), str(reference))
    train.train_and_evaluate(tiny_config(10, checkpoint_every=10), str(resumed))
    data = resumed / "checkpoints" / "10" / "data"
    (data / "process_0-of-1.json").unlink()
    for name in ("process_0-of-2.json", "process_1-of-2.json"):  # positions that would be wrong if read
        (data / name).write_text(json.dumps({"next_index": 3}))
    with caplog.at_level(logging.WARNING):
        summary = train.train_and_evaluate(tiny_config(20, checkpoint_every=10), str(resumed))
    assert "written by 2 process(es), this run has 1" in caplog.text and "after batch 10" in caplog.text
    assert summary["resumed_from_step"] == 10
    assert losses(resumed) == losses(reference)


def test_the_quarantine_says_how_many_steps_it_keeps_and_their_size(tmp_path):
    for name, size in (("30", 3 * 2**20), ("30.1", 2**20), ("40", 0)):
        (tmp_path / name / "state").mkdir(parents=True)
        (tmp_path / name / "state" / "data").write_bytes(b"x" * size)
    assert checkpointing.quarantine_report(str(tmp_path)) == (
        f"{tmp_path} holds 3 set-aside checkpoint step(s), 4.0 MiB in all; they are kept for inspection and never "
        "deleted: remove them when you no longer need them")
