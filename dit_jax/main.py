"""Entry point: parse flags, join the other processes of a multi-process run, and train (or resume:
rerun the same command).

    python -m dit_jax.main --config configs/default.py --workdir runs/demo [--config.train.steps=100]

A run stopped by SIGTERM (preemption) checkpoints and exits with status 143 (128 + SIGTERM),
so a scheduler sees it did not finish and can rerun it. A user error (a bad flag or config
value, a missing file, a busy workdir, checkpoints of another model or none readable) prints
one line and exits with status 2; a run that fails (non-finite numbers, a failed checkpoint
write) prints one line and exits with status 1. ``--verbosity=1`` shows their tracebacks.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dit_jax import checkpointing, compilation_cache, locking, sharding, storage, train

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    config_flags.DEFINE_config_file("config", None, "Training config file (a get_config() module).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the summary.")
    flags.mark_flags_as_required(["config", "workdir"])
    # Only for multi-process runs outside Slurm, Open MPI and Cloud TPU (which are detected).
    sharding.define_distributed_flags()
    compilation_cache.define_flag()


# Errors that are the user's to fix (status 2) and failures of the run itself (status 1): one line each.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, locking.LockHeldError,
               checkpointing.NoIntactCheckpointError)
RUN_FAILURES = (FloatingPointError, checkpointing.CheckpointSaveError)


def fail(message: str, status: int = 2) -> None:
    """Print ``message`` as this command's one error line and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a plain message (status 2) for a bad flag or an unknown config field."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (--helpfull lists the flags)")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
        name = str(e).strip("\"' ")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith("." + name)]
        fail(f"{given[0] if given else name}: the config has no field {name!r} (see dit_jax/recipes.py for "
             "every field and its meaning)")
    return []


def load_config():
    """``FLAGS.config``, or a plain message if the config file is missing or fails to load."""
    try:
        config = FLAGS.config
        config.keys()  # a file that failed to load raises on first use
        return config
    except (OSError, ImportError, SyntaxError) as e:
        path = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
        if not os.path.isfile(path):
            fail(f"config file {path} does not exist (the configs are in configs/, e.g. configs/default.py)")
        fail(f"cannot load config file {path}: {(str(e).strip().splitlines() or [type(e).__name__])[-1].strip()}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = load_config()
    compilation_cache.enable(FLAGS.compilation_cache)
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("config:\n%s", config)
    try:
        result = train.train_and_evaluate(config, storage.absolute(FLAGS.workdir))
    except USER_ERRORS + RUN_FAILURES as e:
        if FLAGS.verbosity >= 1:
            raise
        fail(str(e), 1 if isinstance(e, RUN_FAILURES) else 2)
    if "preempted_at_step" in result:
        raise SystemExit(143)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
