"""Entry point: parse flags, join the other processes of a multi-process run, and train (or resume:
rerun the same command).

    python -m dit_jax.main --config configs/default.py --workdir runs/demo [--config.train.steps=100]

A finished run prints its last lines on stdout (``run_report``): its wall time, the mean loss of its first
and last log windows, and its final evaluations in words (where ``samples.png`` is, the judge's verdict).
A run stopped by SIGTERM (preemption) or Ctrl-C checkpoints its current step and exits with status
143 or 130 (128 + the signal), so a scheduler sees it did not finish and can rerun it; a second
Ctrl-C quits at once, leaving a checkpoint being written uncommitted (never used; set aside by the
next run). A user error (a bad flag or config
value, a missing file, a busy workdir, checkpoints of another model or none readable) prints
one line and exits with status 2; a run that fails (non-finite numbers, a failed checkpoint
write) prints one line and exits with status 1. ``--verbosity=1`` shows their tracebacks.
"""

import os
import re
import signal
import time
from pathlib import Path

STARTED = time.time()  # the command's clock, for the wall time it prints last: before the heavy imports (JAX's)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax import (checkpointing, compilation_cache, console, locking, recipes, run_log, run_report,  # noqa: E402
                     sharding, storage, train)

FLAGS = flags.FLAGS


def config_help() -> str:
    """``--config``'s help: the config files and every top-level group of fields (from ``recipes.base_config``)."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py") if folder.is_dir() else []
    base = recipes.base_config()
    lines = [f"{key}: {', '.join(value.keys())}" if hasattr(value, "keys") else key for key, value in base.items()]
    return ("Training config file (a get_config() module): configs/" + (", ".join(files) if files else "*.py")
            + " (default.py: the CPU demo; one per paper model). Override any field with --config.GROUP.FIELD=VALUE "
            "(e.g. --config.train.steps=100); every field and its meaning: dit_jax/recipes.py. The fields: "
            + "; ".join(lines) + ".")


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the summary.")
    flags.mark_flags_as_required(["config", "workdir"])
    # Only for multi-process runs outside Slurm, Open MPI and Cloud TPU (which are detected).
    sharding.define_distributed_flags()
    compilation_cache.define_flag()


# Errors that are the user's to fix (status 2) and failures of the run itself (status 1): one line each.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, locking.LockHeldError,
               checkpointing.NoIntactCheckpointError)
RUN_FAILURES = (FloatingPointError, checkpointing.CheckpointSaveError)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a plain message (status 2) for a bad flag or an unknown config field."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        console.fail(f"{e} (--helpfull lists the flags)")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
        console.fail(unknown_field_message(e, argv))
    return []


def unknown_field_message(error: BaseException, argv: list[str]) -> str:
    """One line for ml_collections' error on ``--config.a.b=...`` naming a missing field: the flag, the field,
    and its suggestion (``Did you mean "steps"``) as a flag."""
    while isinstance(error, (AttributeError, KeyError)) and error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]  # AttributeError(KeyError(text))
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    name = text.splitlines()[0].strip("\"' ")
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv:
        flag = arg.split("=")[0]
        parts = flag.removeprefix("--").split(".")
        if flag.startswith("--config.") and name in parts[1:]:
            message = f"{flag}: the config has no field {name!r}"
            if suggestion:
                parts[parts.index(name, 1)] = suggestion[1]
                message += f"; did you mean --{'.'.join(parts)}?"
            return message + " (see dit_jax/recipes.py for every field and its meaning)"
    return (f"the config has no field {name!r}" + (f"; did you mean {suggestion[1]!r}?" if suggestion else "")
            + " (see dit_jax/recipes.py for every field and its meaning)")


def load_config():
    """``FLAGS.config``, or a plain message if the config file is missing or fails to load."""
    try:
        config = FLAGS.config
        config.keys()  # a file that failed to load raises on first use
        return config
    except (OSError, ImportError, SyntaxError) as e:
        path = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
        if not os.path.isfile(path):
            console.fail(f"config file {path} does not exist (the configs are in configs/, e.g. configs/default.py)")
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        console.fail(f"cannot load config file {path}: {last}")


def config_line(workdir: str) -> str:
    """The console's one line for the run's config: the file and the overrides given; every field goes to
    ``WORKDIR/config.json`` (written by ``train.train_and_evaluate`` once the run has started)."""
    given = [config_flags.get_config_filename(FLAGS["config"])]
    given += [f"--config.{name}={value}" for name, value in config_flags.get_override_values(FLAGS["config"]).items()]
    return f"config: {' '.join(given)} (every field: {storage.path(workdir) / run_log.CONFIG_FILE})"


def main(argv):
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = load_config()
    compilation_cache.enable(FLAGS.compilation_cache)
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    workdir = storage.absolute(FLAGS.workdir)
    logging.info("%s", config_line(workdir))
    try:
        result = train.train_and_evaluate(config, workdir)
    except USER_ERRORS + RUN_FAILURES as e:
        if FLAGS.verbosity >= 1:
            raise
        console.fail(str(e), 1 if isinstance(e, RUN_FAILURES) else 2)
    except KeyboardInterrupt:  # outside the training loop (which checkpoints on Ctrl-C itself)
        if FLAGS.verbosity >= 1:
            raise
        console.fail("Ctrl-C outside the training loop: stopped; the committed checkpoints are kept (rerun the same "
                     "command to resume)", 128 + signal.SIGINT)
    if "preempted_at_step" in result:
        raise SystemExit(128 + result["stop_signal"])
    if sharding.is_main_process():
        print("\n".join(run_report.final_lines(result, config.evals, workdir, time.time() - STARTED)), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
