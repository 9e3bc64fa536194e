"""Entry point: parse flags, join the other processes of a multi-process run, and train (or resume:
rerun the same command).

    python -m dit_jax.main --config configs/default.py --workdir runs/demo [--config.train.steps=100]

A run stopped by SIGTERM (preemption) checkpoints and exits with status 143 (128 + SIGTERM),
so a scheduler sees it did not finish and can rerun it.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from dit_jax import sharding, train

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    config_flags.DEFINE_config_file("config", None, "Training config file (a get_config() module).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and the summary.")
    flags.mark_flags_as_required(["config", "workdir"])
    # Only for multi-process runs outside Slurm, Open MPI and Cloud TPU (which are detected).
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    logging.info("config:\n%s", FLAGS.config)
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if "preempted_at_step" in result:
        raise SystemExit(143)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
