"""Numerical parity with the official PyTorch DiT: ``python -m dit_jax.parity REFERENCE.npz``.

The reference file holds official weights (``param/<official name>``), inputs and the
official code's outputs (NCHW); its model config is the ``.json`` beside it. This command
loads the weights into our model, recomputes every output array and prints, per array,
the largest absolute error relative to the largest reference magnitude
(``max|ours - ref| / max|ref|``), with PASS/FAIL against 1e-4 (1e-3 for the DDIM loops,
whose outputs compound many model calls). Exits 1 on any failure or unknown array.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from dit_jax import console
from dit_jax import diffusion as gd
from dit_jax.models import DiT
from dit_jax.weights import convert

TOLERANCE = 1e-4
LOOP_TOLERANCE = 1e-3
# Inputs of the official calls: consumed, not recomputed.
INPUT_KEYS = {"x", "t", "y", "cfg/x", "cfg/t", "cfg/y", "cfg/scale", "loss/x_start", "loss/t", "loss/noise", "loss/y",
              "pmv/x_t", "pmv/t", "pmv/y", "psample/noise", "ddim/noise", "ddim/y", "ddim_cfg/noise", "ddim_cfg/y",
              "ddim_cfg/scale"}
# The reference's p_mean_variance, p_sample and DDIM arrays are on create_diffusion("10").
CHAIN_RESPACING = "10"


class Result(NamedTuple):
    name: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error) and self.error <= self.tolerance)


def nhwc(a: np.ndarray) -> jax.Array:
    """Official NCHW -> our NHWC (4-D arrays only; others unchanged)."""
    return jnp.asarray(np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a)


def relative_error(ours: Any, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref| (the reference's scale, so near-zero entries don't dominate)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    scale = max(np.abs(ref).max(initial=0.0), 1e-12)
    return float(np.abs(ours - ref).max(initial=0.0) / scale)


def load_reference(path: str, config_path: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays of ``path`` and the model config from the ``.json`` beside it (or ``config_path``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference file {path} not found")
    config_path = config_path or os.path.splitext(path)[0] + ".json"
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"model config {config_path} not found: the reference's DiT config (input_size, "
                                "patch_size, in_channels, hidden_size, depth, num_heads, num_classes, learn_sigma, "
                                "class_dropout_prob) must be a .json beside the .npz, or pass --config")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    with open(config_path) as f:
        config = json.load(f)
    return arrays, config


def build_reference_model(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> DiT:
    """Our DiT with the reference's official weights loaded."""
    model = DiT(**config, rngs=nnx.Rngs(0))
    state_dict = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    convert.load_official_state_dict(model, state_dict, source="the reference's param/* arrays")
    return model


def _respacings(arrays: dict[str, np.ndarray]) -> list[str]:
    return sorted({k.split("/")[1] for k in arrays if k.startswith("respace/")})


def compute_outputs(model: DiT, arrays: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
    """For each output array our recomputation (lazy, so only the arrays present are computed)."""
    a = {k: nhwc(v) for k, v in arrays.items() if not k.startswith("param/")}
    make = lambda r: gd.create_diffusion(r, learn_sigma=model.out_channels != model.in_channels)
    train_chain = make("")
    cond = lambda y: (lambda x, t: model(x, t, y))
    cfg = lambda y, s: (lambda x, t: model.forward_with_cfg(x, t, y, s))
    to_ref = lambda x: np.transpose(np.asarray(x), (0, 3, 1, 2))

    chain = make(CHAIN_RESPACING)
    # Each official call is computed once, however many of its arrays the file holds.
    losses = functools.cache(lambda: gd.training_losses(train_chain, cond(a["loss/y"]), a["loss/x_start"],
                                                        a["loss/t"], a["loss/noise"]))
    pmv = functools.cache(lambda: gd.p_mean_variance(chain, cond(a["pmv/y"]), a["pmv/x_t"], a["pmv/t"]))

    outputs: dict[str, Callable[[], Any]] = {
        "forward": lambda: to_ref(model(a["x"], a["t"], a["y"])),
        "cfg/forward_with_cfg": lambda: to_ref(model.forward_with_cfg(a["cfg/x"], a["cfg/t"], a["cfg/y"],
                                                                      float(arrays["cfg/scale"]))),
        "loss/x_t": lambda: to_ref(gd.q_sample(train_chain, a["loss/x_start"], a["loss/t"], a["loss/noise"])),
        **{f"loss/{k}": (lambda k=k: losses()[k]) for k in ("loss", "mse", "vb")},
        **{f"pmv/{k}": (lambda k=k: to_ref(pmv()[k])) for k in ("mean", "variance", "log_variance", "pred_xstart")},
        "psample/sample": lambda: to_ref(gd.p_sample(chain, cond(a["pmv/y"]), a["pmv/x_t"], a["pmv/t"],
                                                     a["psample/noise"])["sample"]),
        "ddim/sample": lambda: to_ref(gd.ddim_sample_loop(chain, cond(a["ddim/y"]), a["ddim/noise"],
                                                          jax.random.key(0))),
        "ddim_cfg/sample": lambda: to_ref(gd.ddim_sample_loop(
            chain, cfg(a["ddim_cfg/y"], float(arrays["ddim_cfg/scale"])), a["ddim_cfg/noise"],
            jax.random.key(0))[: a["ddim_cfg/noise"].shape[0] // 2]),
    }
    for r in _respacings(arrays):
        respaced = make(r)
        outputs[f"respace/{r}/timestep_map"] = lambda c=respaced: c.timestep_map
        outputs[f"respace/{r}/betas"] = lambda c=respaced: c.betas
    return outputs


def run_parity(path: str, config_path: str | None = None) -> tuple[list[Result], list[str]]:
    """Recompute every output array of a reference file; returns results and unknown array names."""
    arrays, config = load_reference(path, config_path)
    model = build_reference_model(arrays, config)
    outputs = compute_outputs(model, arrays)
    results, unknown = [], []
    for name in sorted(arrays):
        if name.startswith("param/") or name in INPUT_KEYS:
            continue
        if name not in outputs:
            unknown.append(name)
            continue
        tol = LOOP_TOLERANCE if name.startswith("ddim") else TOLERANCE
        results.append(Result(name, relative_error(outputs[name](), arrays[name]), tol))
    return results, unknown



def report(path: str, config_path: str | None = None) -> int:
    """Print the per-array table for ``path``; returns the exit code (1 on any failure)."""
    results, unknown = run_parity(path, config_path)
    print(f"parity against {path} on {jax.devices()[0].platform}  (error = max|ours - ref| / max|ref|)")
    for r in results:
        print(f"  {'PASS' if r.passed else 'FAIL'}  {r.name:<28} {r.error:10.3e}  (tolerance {r.tolerance:.0e})")
    for name in unknown:
        print(f"  FAIL  {name:<28} unknown array: this tool does not know how to recompute it")
    failed = sum(not r.passed for r in results) + len(unknown)
    total = len(results) + len(unknown)
    print(f"{total - failed} of {total} arrays match" + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0


def _define_flags() -> None:
    """The command line, defined only when run as a program (so any two command modules import together)."""
    flags.DEFINE_string("config", None, "Model config .json (default: beside the reference file).")


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    if len(argv) != 2:
        raise app.UsageError("usage: python -m dit_jax.parity REFERENCE.npz [--config CONFIG.json]")
    sys.exit(report(argv[1], flags.FLAGS.config))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
