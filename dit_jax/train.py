"""Training: the paper's recipe as one jitted step, and ``train_and_evaluate`` around it.

The hot step is a pure function of the split model state (``nnx.split``/``nnx.merge``):
``train_step(state, batch) -> (state, metrics)`` with params, AdamW state, EMA params, step
and RNG in one ``TrainState`` pytree (``dit_jax.train_state``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from typing import IO, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dit_jax import (checkpointing, console, diffusion as gd, divergence, flops, input_pipeline, locking, optimizer,
                     run_log, sharding, stop_signals, storage)
from dit_jax.evaluators import common as evaluators
from dit_jax.model_compute import DTYPES
from dit_jax.models import count_params
from dit_jax.train_state import TrainState, abstract_train_state, build_model, on_mesh
from dit_jax.weights import finetune


def build_diffusion(config: ml_collections.ConfigDict, respacing: str = "") -> gd.Diffusion:
    """The training chain (``respacing=""``) or a respaced sampling chain."""
    return gd.create_diffusion(respacing, noise_schedule=config.diffusion.noise_schedule,
                               learn_sigma=config.model.learn_sigma, diffusion_steps=config.diffusion.steps)


def _step_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The optimiser and EMA schedule ``train_step`` is bound to."""
    return {"tx": optimizer.make_optimizer(config), "ema_decay": optimizer.ema_decay_schedule(config)}


# The name scope of the step's optimiser, EMA and gradient-norm ops (``perf.time_split`` finds them by it).
OPTIMIZER_SCOPE = "optimizer_ema"


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, fixed: nnx.State,
               diffusion: gd.Diffusion, tx: optax.GradientTransformation,
               ema_decay: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
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
    with jax.named_scope(OPTIMIZER_SCOPE):  # names these ops in the compiled program, for profiles
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay(state.step))
        metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
    return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, fixed: nnx.State,
                    diffusion: gd.Diffusion, mesh: Mesh | None = None, state: TrainState | None = None,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``train_step`` bound to this run's model, chain and optimiser, jitted with the state donated.

    With a ``mesh`` the state keeps ``sharding.train_state_shardings`` and the batch ``sharding.batch_sharding``;
    ``state`` (abstract or concrete, already laid out on ``mesh``) gives those shardings without
    tracing the model's initialisation again.
    """
    step = functools.partial(train_step, graphdef=graphdef, fixed=fixed, diffusion=diffusion, **_step_options(config))
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state_shardings = jax.tree.map(lambda a: a.sharding, abstract_train_state(config, mesh) if state is None else state)
    return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())))


def _check_config(config: ml_collections.ConfigDict) -> None:
    problems = []
    t = config.train
    if t.steps < 1 or t.batch_size < 1:
        problems.append(f"train.steps and train.batch_size must be >= 1 (got {t.steps}, {t.batch_size})")
    problems += optimizer.config_problems(config)
    if t.log_every < 1 or t.checkpoint_every < 1 or t.max_to_keep < 1:
        problems.append(f"train.log_every, train.checkpoint_every and train.max_to_keep must be >= 1 "
                        f"(got {t.log_every}, {t.checkpoint_every}, {t.max_to_keep})")
    if t.profile_steps < 0:
        problems.append(f"train.profile_steps must be >= 0 (0 = off), got {t.profile_steps}")
    if config.data.source == "synthetic" and config.data.image_size != config.model.input_size:
        problems.append(f"data.image_size ({config.data.image_size}) must equal model.input_size "
                        f"({config.model.input_size}) for pixel-space synthetic data")
    problems += checkpointing.atomicity_problems(t.checkpoint_atomicity)
    problems += finetune.init_from_problems(config.train.init_from)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    sharding.check_config(config, jax.device_count())


def step_flops(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, fixed: nnx.State,
               diffusion: gd.Diffusion, state: TrainState) -> float:
    """Flops of one ``train_step`` on the global batch of ``config`` (XLA's count; a multiply-add is two).

    Counted on the unsharded step from shapes alone, lowered for the host CPU
    (``flops.lowered_flops``): ``state`` may be abstract, and no mesh or device takes part (a step
    jitted with a GPU mesh's shardings would lower for the GPU, whose backend reports no flops).
    A model with cuDNN attention is counted with XLA's attention instead: the same matmuls,
    and cuDNN's kernel lowers only for GPUs.
    """
    if config.attention != "xla":
        xla_config = config.copy_and_resolve_references()
        xla_config.attention = "xla"
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(xla_config, rngs=nnx.Rngs(0))))
    m, n = config.model, config.train.batch_size
    batch = {"image": jax.ShapeDtypeStruct((n, m.input_size, m.input_size, m.in_channels), jnp.float32),
             "label": jax.ShapeDtypeStruct((n,), jnp.int32)}
    step = functools.partial(train_step, graphdef=graphdef, **_step_options(config))
    count = lambda state, batch, fixed, diffusion: step(state, batch, fixed=fixed, diffusion=diffusion)
    return flops.lowered_flops(count, state, batch, fixed, diffusion)


def progress_line(record: dict[str, Any], total_steps: int, seconds: float, steps_done: int) -> str:
    """The console's line for one log window: step, loss, the window's steps/s and img/s (the figures in
    ``metrics.jsonl``), and the time left at this invocation's mean pace so far."""
    left = (total_steps - record["step"]) * seconds / steps_done if steps_done else 0.0
    line = (f"step {record['step']}/{total_steps}: loss {record['loss']:.4f}, {record['steps_per_sec']:.3g} steps/s, "
            f"{record['images_per_sec']:.4g} img/s")
    if "mfu" in record:
        line += f", MFU {100 * record['mfu']:.1f}%"
    return line + f", {console.clock(left)} left"


def _run_info(config: ml_collections.ConfigDict, workdir: str, source: input_pipeline.Source) -> evaluators.RunInfo:
    """What the evaluators may know about this run (``evaluators.RunInfo``)."""
    metadata = getattr(source, "metadata", None)
    return evaluators.RunInfo(
        workdir=workdir, seed=config.seed, last_step=config.train.steps, num_classes=config.model.num_classes,
        data_source=config.data.source,
        image_size=metadata["resolution"] if metadata else config.data.image_size, latents_metadata=metadata,
        noise_schedule=config.diffusion.noise_schedule, diffusion_steps=config.diffusion.steps,
        learn_sigma=config.model.learn_sigma)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its newest intact checkpoint), evaluating the EMA model.

    Checkpoints go to ``workdir/checkpoints`` every ``train.checkpoint_every`` steps, before each
    evaluation, at the end and on SIGTERM or Ctrl-C (then the run stops and returns
    ``{"preempted_at_step": step, "stop_signal": signum}``). The ``config.evals`` entries (``dit_jax.evaluators``)
    run on the EMA model every ``every`` steps and at the last step; an evaluation stopped by a signal reruns on
    resume. Process 0 writes ``config.json`` (every field of the config, once the run has started), TensorBoard
    events, ``metrics.jsonl`` and, at the end, ``summary.json`` (the training figures and the last step's
    evaluations).
    """
    _check_config(config)
    # One run per workdir: a second one refuses here, before touching anything.
    with locking.hold(workdir, purpose="training run"):
        start = time.time()
        with contextlib.ExitStack() as stack:  # closes the logs, restores the signal handlers, awaits the last save
            run, state, history, pending = _prepare(config, workdir, stack)
            outcome = _train(run, state, history, pending)
            if isinstance(outcome, dict):
                return outcome
        return _summarise(run, *outcome, seconds=time.time() - start)


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run set up by ``_prepare``: what its loop reads (its resources are closed by the caller's stack)."""

    config: ml_collections.ConfigDict
    workdir: str
    is_main: bool
    mesh: Mesh
    run_info: evaluators.RunInfo
    evals: list[evaluators.Entry]
    batches: Any  # the data iterator, checkpointed with the state
    checkpoint_dir: str
    graphdef: nnx.GraphDef
    fixed: nnx.State
    manager: Any  # the Orbax checkpoint manager (``checkpointing.create_manager``)
    start_step: int
    resumed: bool
    num_params: int
    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
    lr_schedule: optax.Schedule
    peak_flops: float | None  # the mesh's peak, where the devices' is known
    flop_count: concurrent.futures.Future | None  # one step's flops (for MFU), counted while the first step compiles
    writer: Any  # CLU's metric writer: TensorBoard on process 0
    log: IO[str] | None  # metrics.jsonl, open on process 0
    hooks: list[Callable[[int], Any]]
    stop_request: stop_signals.StopRequest


class Counters(NamedTuple):
    """The loop's running totals for this invocation: when it and the current log window started (a window's
    start moves on by each evaluation's time, which is not training time), the steps trained in finished
    windows and their seconds, and the evaluations' seconds."""

    start_time: float
    window_start: float
    trained_steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


def _prepare(config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack
             ) -> tuple[Run, TrainState, list[dict[str, Any]], list[evaluators.Entry]]:
    """Set up a run of a checked config in a locked workdir: the mesh, data and evaluators, the state restored
    (or initialised), the step, the logs and the stop signals (their closing pushed on ``stack``); with the
    state, the log's history up to the start step and the evaluations of that step still to run."""
    # CLU's writers import TensorFlow: imported here, so the step, the benchmark and sampling run without it.
    from clu import metric_writers, periodic_actions

    is_main = sharding.is_main_process()
    mesh = sharding.create_mesh(config.mesh)
    source = input_pipeline.create_source(config)
    run_info = _run_info(config, workdir, source)
    evals = evaluators.create_evaluators(config.evals, run_info)  # each checks its settings before training
    batches = input_pipeline.make_train_iterator(
        source, batch_size=sharding.process_batch_size(config.train.batch_size, mesh), seed=config.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    checkpoint_dir = os.fspath(storage.path(workdir) / "checkpoints")
    # The model is built (abstractly) before any checkpoint is touched: a bad model config stops here.
    graphdef, fixed, abstract_state, init_state = on_mesh(config, mesh)
    checkpointing.one_line_failures()
    manager = checkpointing.create_manager(checkpoint_dir, every_steps=config.train.checkpoint_every,
                                           max_to_keep=config.train.max_to_keep,
                                           atomicity=config.train.checkpoint_atomicity)
    stack.callback(checkpointing.close, manager)  # waits for the last async save
    # Restore onto this mesh's layout (which may differ from the saving run's); initialise only if nothing is saved.
    state = checkpointing.restore_latest(manager, abstract_state, batches, config,
                                         quarantine_dir=os.fspath(storage.path(workdir) / "checkpoints_corrupt"))
    resumed = state is not None
    state = state if resumed else finetune.create_initial_state(config, init_state, workdir=workdir)
    start_step = int(state.step)
    if start_step > config.train.steps:
        raise ValueError(f"the checkpoint in {checkpoint_dir} is at step {start_step}, past train.steps="
                         f"{config.train.steps}; raise train.steps to continue it, or use a new --workdir")
    num_params = count_params(nnx.merge(graphdef, state.params, fixed))
    logging.info("model: %s, %d trainable parameters on mesh %s; %s", config.model.name or "custom DiT",
                 num_params, dict(mesh.shape),
                 f"resumed from step {start_step}" if resumed else "starting from scratch")
    if is_main:  # every field of this invocation's config (the console names only its file and overrides)
        storage.write_json_atomic(storage.path(workdir) / run_log.CONFIG_FILE, config.to_dict())
    diffusion = build_diffusion(config)
    step_fn = make_train_step(config, graphdef, fixed, diffusion, mesh, abstract_state)
    # MFU where the devices' peak is known (the count costs a CPU lowering, skipped otherwise); it runs in
    # a thread while the first step compiles.
    peak = flops.peak_flops_per_device(mesh.devices.flat[0], DTYPES[config.dtype])
    peak_flops = peak * mesh.devices.size if peak else None
    pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
    flop_count = pool.submit(step_flops, config, graphdef, fixed, diffusion, abstract_state) if peak_flops else None

    metrics_path = storage.path(workdir) / run_log.METRICS_FILE
    history = run_log.read_history(metrics_path, up_to_step=start_step)
    if is_main and resumed:
        run_log.rewind_event_files(workdir, start_step)  # TensorBoard gets each step once
    # Evaluations of the restored step that did not finish (a stop during them) rerun first; a finished
    # run evaluates its last step again.
    pending = [e for e in evals if e.due(start_step, config.train.steps) and (
        start_step == config.train.steps or not any(h.get("eval") == e.name and h["step"] == start_step
                                                    for h in history))]
    history = [h for h in history if not (h["step"] == start_step and h.get("eval") in {e.name for e in pending})]
    # TensorBoard only: the console gets one line per log window (``progress_line``) and per evaluation.
    writer = metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)] if is_main else [])
    stack.callback(writer.close)
    hooks = []
    if is_main and config.train.profile_steps:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.train.profile_steps,
                                              profile_duration_ms=None, first_profile=start_step + 10,
                                              every_secs=None))
    stop_request = stack.enter_context(stop_signals.stop_on_signals())
    log = stack.enter_context(run_log.rewrite(metrics_path, history)) if is_main else None
    run = Run(config=config, workdir=workdir, is_main=is_main, mesh=mesh, run_info=run_info, evals=evals,
              batches=batches, checkpoint_dir=checkpoint_dir, graphdef=graphdef, fixed=fixed, manager=manager,
              start_step=start_step, resumed=resumed, num_params=num_params, step_fn=step_fn,
              lr_schedule=optimizer.learning_rate_schedule(config), peak_flops=peak_flops, flop_count=flop_count,
              writer=writer, log=log, hooks=hooks, stop_request=stop_request)
    return run, state, history, pending


def _train(run: Run, state: TrainState, history: list[dict[str, Any]], pending: list[evaluators.Entry]
           ) -> dict[str, Any] | tuple[list[dict[str, Any]], dict[str, dict[str, Any]], Counters]:
    """Run the pending evaluations, then train from the start step to ``train.steps``: log each window, check,
    save and evaluate. A stop's result (``{"preempted_at_step", "stop_signal"}``), or the history, the last
    step's evaluations and the totals."""
    steps = run.config.train.steps
    counters = Counters(start_time=time.time(), window_start=time.time())
    window, unchecked, pending_save, final = [], [], False, {}
    last_checkpoint = run.start_step if run.resumed else None
    if pending:
        records, results, counters, stopped = _evaluate(run, state, pending, run.start_step, counters)
        history.extend(records)
        final = results if run.start_step == steps else final
        if stopped:
            return _stopped(run, run.start_step)
    for step in range(run.start_step + 1, steps + 1):
        state, metrics = run.step_fn(state, sharding.global_batch(next(run.batches), run.mesh))
        pending_save = checkpointing.check_saves(run.manager, pending_save)  # a failed save stops the run at once
        window.append(metrics)
        unchecked.append((step, metrics))
        for hook in run.hooks:
            hook(step)
        stop = run.stop_request.is_set() or run.manager.reached_preemption(step)
        due = [e for e in run.evals if e.due(step, steps)]
        # A step is saved before it is evaluated: a stop during the evaluation loses nothing.
        save = stop or bool(due) or step % run.config.train.checkpoint_every == 0 or step == steps
        log_now = step % run.config.train.log_every == 0 or step == steps
        if save or log_now:  # never log or checkpoint past a non-finite step
            divergence.check_metrics(unchecked, last_checkpoint, run.checkpoint_dir)
            unchecked = []
        if log_now:
            record, counters = _log_window(run, step, window, counters)
            history.append(record)
            window = []
        if save:  # never save (or name as good) a state that is not finite, though its loss was
            checksums = divergence.check_state(state, step, last_checkpoint, run.checkpoint_dir)
            pending_save = checkpointing.save(run.manager, step, state, run.batches, run.config, checksums=checksums,
                                              force=True)
            last_checkpoint = step
        if due and not stop:
            records, results, counters, stop = _evaluate(run, state, due, step, counters)
            history.extend(records)
            final = results if step == steps else final
        if stop:
            logging.warning("%s: stopped at step %d after checkpointing it; rerun the same command to resume",
                            stop_signals.signal_name(run.stop_request), step)
            return _stopped(run, step)
    return history, final, counters


def _stopped(run: Run, step: int) -> dict[str, Any]:
    """The result of a run stopped by a signal after checkpointing ``step``."""
    return {"preempted_at_step": step, "stop_signal": run.stop_request.signum or signal.SIGTERM}


def _evaluate(run: Run, state: TrainState, entries: list[evaluators.Entry], step: int, counters: Counters
              ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], Counters, bool]:
    """Run ``entries`` on this step's EMA model and write their results: (their log records, their results, the
    totals with the evaluation's time counted, whether a stop came during them)."""
    t0 = time.time()
    logging.info("evaluating step %d: %s", step, ", ".join(e.name for e in entries))
    ema = evaluators.EmaModel(nnx.merge(run.graphdef, state.ema_params, run.fixed), step, run.run_info,
                              stop_requested=lambda: run.stop_request.is_set() or run.manager.reached_preemption(step))
    try:
        results, stopped = evaluators.run_entries(entries, ema), False
    except evaluators.Interrupted as err:
        results, stopped = err.completed, True
    records = evaluators.log_entries(results, step, run.writer, run.log)
    for name, result in results.items():
        for line in evaluators.describe(run.config.evals[name]["type"], result, run.workdir):
            logging.info("step %d, %s: %s", step, name, line)
    seconds = time.time() - t0  # evaluation time is not training time
    counters = counters._replace(eval_seconds=counters.eval_seconds + seconds,
                                 window_start=counters.window_start + seconds)
    if stopped:
        logging.warning("%s during the evaluations of step %d (checkpointed): stopping; %s rerun on resume",
                        stop_signals.signal_name(run.stop_request), step,
                        [e.name for e in entries if e.name not in results])
    return records, results, counters, stopped


def _log_window(run: Run, step: int, window: list[dict[str, jax.Array]], counters: Counters
                ) -> tuple[dict[str, Any], Counters]:
    """Write the log window ending at ``step`` (its metrics' means, speed, learning rate, MFU) to TensorBoard,
    ``metrics.jsonl`` and the console: its record, and the totals with the window counted and a new one begun."""
    elapsed = time.time() - counters.window_start
    record = {k: float(np.mean(v)) for k, v in jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *window)).items()}
    record.update(step=step, steps_per_sec=len(window) / elapsed,
                  images_per_sec=len(window) * run.config.train.batch_size / elapsed,
                  learning_rate=float(run.lr_schedule(step - 1)))  # the last step's (optax counts from 0)
    if run.peak_flops:
        record["mfu"] = run.flop_count.result() * record["steps_per_sec"] / run.peak_flops
    run.writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
    if run.log:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    logging.info("%s", progress_line(record, run.config.train.steps,
                                     time.time() - counters.start_time - counters.eval_seconds, step - run.start_step))
    return record, counters._replace(trained_steps=counters.trained_steps + len(window),
                                     train_seconds=counters.train_seconds + elapsed, window_start=time.time())


def _summarise(run: Run, history: list[dict[str, Any]], final: dict[str, dict[str, Any]], counters: Counters, *,
               seconds: float) -> dict[str, Any]:
    """The run's ``summary.json`` (written by process 0, and logged): the training figures and the last step's
    evaluations; ``seconds``: the whole invocation's."""
    losses = [h for h in history if "eval" not in h]
    summary: dict[str, Any] = {
        "model": run.config.model.name or "custom",
        "trainable_params": int(run.num_params),
        "steps": run.config.train.steps,
        "batch_size": run.config.train.batch_size,
        "resumed_from_step": run.start_step,
        # Means over the first and last log windows, and the steps each covers (unknown if metrics.jsonl of a
        # finished run was lost).
        "first_loss": losses[0]["loss"] if losses else None,
        "first_loss_steps": [1, losses[0]["step"]] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "final_loss_steps": [losses[-2]["step"] + 1 if len(losses) > 1 else 1, losses[-1]["step"]] if losses else None,
        "train_seconds": counters.train_seconds,  # this invocation's training steps only (compilation included)
        # The steps this invocation trained over their seconds; None if it trained none (a finished run rerun).
        "steps_per_sec": counters.trained_steps / counters.train_seconds if counters.trained_steps else None,
    }
    # The last step's evaluations, images left out (they are PNG files and TensorBoard images).
    summary["evals"] = {name: {k: evaluators.jsonable(v) for k, v in result.items() if not evaluators.is_image(v)}
                        for name, result in final.items()}
    summary["eval_seconds"] = counters.eval_seconds
    summary["total_seconds"] = seconds
    if run.is_main:
        storage.write_atomic(storage.path(run.workdir) / run_log.SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary
