"""The files of runs: a workdir's metrics log and TensorBoard events read back, checkpoints and latents
folders written as the project writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def read_log(workdir: Path, *, evals: bool = False) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``: the training lines, or (``evals``) the evaluation lines (``{"step", "eval", ...}``)."""
    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [h for h in lines if ("eval" in h) == evals]


def write_checkpoints(workdir: Path, config, steps: tuple[int, ...], *, atomicity: str = "auto") -> dict[int, Any]:
    """Checkpoints of ``config``'s initial state at ``steps`` in ``workdir/checkpoints``, as a run writes them
    (``checkpointing.save``, committed as ``atomicity`` says), each step with its own EMA (the initial one
    plus a step-dependent shift) so the steps and the EMA are told apart from the raw parameters. Returns
    the states by step."""
    import jax

    from dit_jax import checkpointing, input_pipeline, train_state

    _, _, state = train_state.create_train_state(config)
    batches = input_pipeline.make_train_iterator(input_pipeline.create_source(config),
                                                 batch_size=config.train.batch_size, seed=config.seed)
    manager = checkpointing.create_manager(str(workdir / "checkpoints"), every_steps=1, max_to_keep=10,
                                           atomicity=atomicity)
    states = {}
    try:
        for step in steps:
            states[step] = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32),
                                         ema_params=jax.tree.map(lambda p, s=step: p + 0.01 * s, state.params))
            checkpointing.save(manager, step, states[step], batches, config, force=True,
                               checksums=checkpointing.fingerprint(states[step])[0])
            manager.wait_until_finished()
    finally:
        manager.close()
    return states


def tensorboard_steps(workdir) -> dict[str, list[int]]:
    """Each tag in the run's TensorBoard event files, with the steps it was written at."""
    from tensorboard.backend.event_processing import event_accumulator

    tags: dict[str, list[int]] = {}
    for path in sorted(workdir.glob("events.out.tfevents.*")):
        accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.TENSORS: 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["tensors"]:
            tags.setdefault(tag, []).extend(event.step for event in accumulator.Tensors(tag))
    return tags


LATENT_SCALE = 0.5  # the scale factor ``write_latents`` records


def write_latents(folder, n: int, *, std: float, per_shard: int = 40, shape=(2, 2, 4)) -> str:
    """A latents folder whose record i has mean +(i+1) (view 0) / -(i+1) (flipped view) and the given std."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from dit_jax import latents

    shards = []
    count = -(-n // per_shard)
    for s in range(count):
        name = latents.shard_name(s, count)
        writer = ArrayRecordWriter(str(folder / name), latents.WRITER_OPTIONS)
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            mean = np.stack([np.full(shape, i + 1.0), np.full(shape, -(i + 1.0))])
            writer.write(latents.encode_record(i % 4, mean, np.full_like(mean, std), "float16"))
        writer.close()
        shards.append({"file": name, "num_records": min(n, (s + 1) * per_shard) - s * per_shard})
    metadata = {"latent_shape": list(shape), "dtype": "float16", "scale_factor": LATENT_SCALE, "resolution": 16,
                "num_images": n, "counts_per_class": [n // 4] * 4, "shards": shards}
    (folder / latents.METADATA).write_text(json.dumps(metadata))
    return str(folder)
