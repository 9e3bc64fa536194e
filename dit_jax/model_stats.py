"""Parameter counts and Gflops of the paper's 12 DiT models, checked against the paper.

``python -m dit_jax.model_stats [--json] [--models DiT-XL/2,DiT-S/8]`` prints, per model at
256x256, the trainable parameter count next to the official one and the forward-pass
Gflops next to the paper's Table 4, plus the Gflops of one training step (forward and
backward of the diffusion loss). It exits non-zero if a count differs or a Gflops value is
more than 1% off.

Nothing runs and no weights are allocated: the model is built with ``nnx.eval_shape``, the
programs are only lowered (never compiled or executed), and the flops are XLA's cost
analysis of the lowered program, so they count what the code actually computes. XLA also
counts the elementwise work (LayerNorm, softmax, GELU, modulation, residual and bias adds)
that the paper's count of matmul multiply-adds leaves out: about 0.25% more flops for the
wide models and up to 0.8% for the narrow S models, whose matmuls are smallest relative to it.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from dit_jax import console
from dit_jax.diffusion import create_diffusion, training_losses
from dit_jax.flops import xla_gflops
from dit_jax.models import MODELS, count_params, create_model


class PaperEntry(NamedTuple):
    """Official trainable parameters (official code) and forward Gflops (paper, Table 4)."""

    params: int
    gflops: float


# At 256x256 (32x32x4 latents), 1000 classes, learned sigma: the paper's Table 4 (parameters counted
# from the official code, trainable only; Gflops for one forward pass, a multiply-add counted once).
PAPER_TABLE: dict[str, PaperEntry] = {
    "DiT-S/8": PaperEntry(33_142_016, 0.36),
    "DiT-S/4": PaperEntry(32_920_448, 1.41),
    "DiT-S/2": PaperEntry(32_865_056, 6.06),
    "DiT-B/8": PaperEntry(130_869_248, 1.42),
    "DiT-B/4": PaperEntry(130_426_496, 5.56),
    "DiT-B/2": PaperEntry(130_315_808, 23.01),
    "DiT-L/8": PaperEntry(458_578_432, 5.01),
    "DiT-L/4": PaperEntry(457_988_224, 19.70),
    "DiT-L/2": PaperEntry(457_840_672, 80.71),
    "DiT-XL/8": PaperEntry(675_664_640, 7.39),
    "DiT-XL/4": PaperEntry(675_000_704, 29.05),
    "DiT-XL/2": PaperEntry(674_834_720, 118.64),
}
# The model config behind the paper's numbers (SD-VAE latents of 256x256 ImageNet images).
PAPER_SETTING: dict[str, Any] = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
# Largest accepted relative difference from the paper's Gflops.
GFLOPS_TOLERANCE = 0.01



def model_stats(name: str, *, batch_size: int = 1, train: bool = True, **overrides: Any) -> dict[str, Any]:
    """Parameter count and per-image Gflops (forward, training step) of a registry model.

    ``overrides`` change the model config (e.g. ``block_type``); the comparison with the
    paper (``official_params``, ``params_match``, ``paper_gflops``, ``gflops_diff_pct``)
    is only made without them and is ``None`` otherwise. Flops are counted on a batch of
    ``batch_size`` and divided by it. ``train=False`` skips the training step (``None``),
    which takes about twice as long to lower as the forward.
    """
    model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **{**PAPER_SETTING, **overrides}))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.ShapeDtypeStruct((batch_size, model.input_size, model.input_size, model.in_channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    diffusion = create_diffusion("", learn_sigma=model.out_channels != model.in_channels)

    def forward(params, rest, x, t, y):
        return nnx.merge(graphdef, params, rest)(x, t, y)

    def loss(params, rest, x_start, t, y, noise):
        dit = nnx.merge(graphdef, params, rest)
        return training_losses(diffusion, lambda x_t, ts: dit(x_t, ts, y), x_start, t, noise)["loss"].mean()

    stats = {
        "model": name,
        "params": count_params(model),
        "gflops": xla_gflops(forward, params, rest, x, labels, labels) / batch_size,
        "train_gflops": xla_gflops(jax.grad(loss), params, rest, x, labels, labels, x) / batch_size if train else None,
    }
    if overrides:  # the paper's numbers hold for its own setting only
        return {**stats, **dict.fromkeys(("official_params", "params_match", "paper_gflops", "gflops_diff_pct"))}
    paper = PAPER_TABLE[name]
    return {
        **stats,
        "official_params": paper.params,
        "params_match": stats["params"] == paper.params,
        "paper_gflops": paper.gflops,
        "gflops_diff_pct": 100 * (stats["gflops"] / paper.gflops - 1),
    }


def problems(stats: dict[str, Any]) -> list[str]:
    """What in one ``model_stats`` result disagrees with the paper (empty when all agrees)."""
    found = []
    if stats["params_match"] is False:
        found.append(f"{stats['model']}: {stats['params']:,} parameters, official {stats['official_params']:,}")
    if stats["gflops_diff_pct"] is not None and abs(stats["gflops_diff_pct"]) > 100 * GFLOPS_TOLERANCE:
        found.append(f"{stats['model']}: {stats['gflops']:.3f} Gflops, paper {stats['paper_gflops']} "
                     f"({stats['gflops_diff_pct']:+.2f}%)")
    return found


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of ``model_stats`` results."""
    header = (f"{'model':<9} {'params':>12} {'official':>12} {'match':>5} {'Gflops':>8} "
              f"{'paper':>7} {'diff %':>7} {'train Gflops/img':>17}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<9} {r['params']:>12,} {r['official_params']:>12,} "
                     f"{'yes' if r['params_match'] else 'NO':>5} {r['gflops']:>8.3f} {r['paper_gflops']:>7.2f} "
                     f"{r['gflops_diff_pct']:>+7.2f} {r['train_gflops']:>17.3f}")
    return "\n".join(lines)


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    flags.DEFINE_bool("json", False, "Print a JSON list instead of a table.")
    flags.DEFINE_list("models", list(PAPER_TABLE), "Comma-separated model names.")


def main(argv: list[str]) -> int:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    unknown = [m for m in f.models if m not in MODELS]
    if unknown:
        raise app.UsageError(f"unknown models {unknown}; choose from {', '.join(PAPER_TABLE)}")
    rows = [model_stats(name) for name in f.models]
    print(json.dumps(rows, indent=1) if f.json else format_table(rows))
    found = [p for row in rows for p in problems(row)]
    for p in found:
        print(f"MISMATCH {p}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
