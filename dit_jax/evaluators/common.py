"""The evaluator registry (``config.evals``) and what every evaluator shares: the run, the EMA model, decoding.

``config.evals`` holds named entries ``{type, every, ...}``. ``type`` names a module of this package,
``dit_jax/evaluators/<type>.py``, found by importlib (as big_vision does), which defines::

    DEFAULTS: dict[str, Any]        # every setting it takes besides type/every, with its default
    class Evaluator:
        def __init__(self, settings, run: RunInfo, *, name: str): ...  # checks its settings (ValueError)
        def run(self, ema: EmaModel) -> dict[str, Any]: ...              # one evaluation of one step's EMA model
    def report(result, workdir) -> list[str]: ...  # optional: a result in words for the console (``describe``)

``every`` is N > 0 (every N steps and at the last step), 0 (only at the last step) or -1 (off).
An evaluator gets only its own settings, the ``RunInfo`` of the run and, at each evaluation, the
EMA model of that step (``EmaModel``). Its result maps names to numbers (TensorBoard scalars and
``metrics.jsonl``), uint8 ``[H, W, C]`` arrays (TensorBoard images) or other JSON values
(``metrics.jsonl`` and ``summary.json`` only); the trainer writes them (``log_entries``). An
evaluator may set ``off`` to a reason (e.g. fid without a reference) to take no part in the run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pkgutil
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from dit_jax import diffusion as gd, vae as vae_lib
from dit_jax.models import DiT
from dit_jax.sampling import engine, image_grid

COMMON_FIELDS = ("type", "every")
_NOT_EVALUATORS = ("common",)


class Interrupted(Exception):
    """A stop was requested (SIGTERM, preemption) while an evaluation ran; it reruns on resume."""


class RunInfo(NamedTuple):
    """What an evaluator may know about the run besides its own settings."""

    workdir: str
    seed: int
    last_step: int                      # train.steps: every active evaluator runs there
    num_classes: int                    # the model's classes (labels 0 .. num_classes - 1)
    data_source: str                    # synthetic (pixels in [-1, 1]) | latents (scaled VAE latents)
    image_size: int                     # pixel size of the images (for latents: the extraction's resolution)
    latents_metadata: dict[str, Any] | None  # the latents folder's metadata.json (latent runs)
    noise_schedule: str
    diffusion_steps: int
    learn_sigma: bool

    def chain(self, respacing: str) -> gd.Diffusion:
        """The sampling chain ``respacing`` (e.g. "250", "ddim50") of the run's diffusion."""
        return gd.create_diffusion(respacing, noise_schedule=self.noise_schedule, learn_sigma=self.learn_sigma,
                                   diffusion_steps=self.diffusion_steps)


@dataclasses.dataclass
class EmaModel:
    """One step's EMA model, sampled on demand; equal sampling requests at one step share their samples."""

    model: DiT
    step: int
    run: RunInfo
    stop_requested: Callable[[], bool] = lambda: False
    _cache: dict = dataclasses.field(default_factory=dict)

    def raise_if_stopped(self) -> None:
        """Raise ``Interrupted`` if the run was asked to stop (call it between the batches of a long evaluation)."""
        if self.stop_requested():
            raise Interrupted(f"stop requested during an evaluation at step {self.step}")

    def samples(self, labels: np.ndarray, *, seed: int, cfg_scale: float, sampler: str,
                respacing: str) -> np.ndarray:
        """Guided samples (model space: pixels in [-1, 1] or scaled latents) of ``labels``, on every process."""
        labels = np.asarray(labels, np.int32)
        key = ("samples", labels.tobytes(), seed, float(cfg_scale), sampler, respacing)
        if key not in self._cache:
            out = engine.generate(self.model, self.run.chain(respacing), jnp.asarray(labels), jax.random.key(seed),
                                  cfg_scale=cfg_scale, sampler=sampler)
            self._cache[key] = np.asarray(multihost_utils.process_allgather(out, tiled=True))
        return self._cache[key]

    def images(self, labels: np.ndarray, *, decoder: Decoder, seed: int, cfg_scale: float, sampler: str,
               respacing: str) -> np.ndarray:
        """uint8 [N, H, W, 3] images of ``labels``: ``samples`` decoded (``decoder``) and quantised."""
        key = ("images", np.asarray(labels, np.int32).tobytes(), seed, float(cfg_scale), sampler, respacing,
               decoder.name)
        if key not in self._cache:
            self._cache[key] = decoder(self.samples(labels, seed=seed, cfg_scale=cfg_scale, sampler=sampler,
                                                    respacing=respacing))
        return self._cache[key]


def vae_name(run: RunInfo, vae: str = "") -> str | None:
    """The VAE that decodes this run's samples: ``vae``, else the one the latents name; None for pixel runs."""
    if run.data_source != "latents":
        if vae:
            raise ValueError(f"vae={vae!r} is only for latent runs; this run trains on {run.data_source} pixels")
        return None
    name = vae or (run.latents_metadata or {}).get("vae", "")
    if not name:
        raise ValueError("the latents' metadata.json names no VAE: set vae to the VAE the latents were "
                         "encoded with (a diffusers folder or hub id)")
    return name


@functools.lru_cache(maxsize=2)
def load_vae(name: str) -> vae_lib.AutoencoderKL:
    """The VAE ``name`` (diffusers folder or hub id), loaded once per process."""
    return vae_lib.load_vae(name)


class Decoder:
    """Model-space samples -> uint8 images: pixels quantised, or latents decoded through their VAE first."""

    def __init__(self, run: RunInfo, vae: str = "", *, batch_size: int = 32):
        self.batch_size = batch_size
        self._vae = None
        name = vae_name(run, vae)
        self.name = name or "pixels"
        if name is None:
            return
        self.scale_factor = float((run.latents_metadata or {}).get("scale_factor", 0.18215))
        self._vae = nnx.split(load_vae(name))

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self._vae is None:
            return image_grid.from_model_range(samples)
        graphdef, state = self._vae
        out = [np.asarray(_decode(graphdef, state, jnp.asarray(samples[i:i + self.batch_size] / self.scale_factor)))
               for i in range(0, len(samples), self.batch_size)]
        return image_grid.from_model_range(np.concatenate(out))


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array) -> jax.Array:
    return jnp.clip(nnx.merge(graphdef, state).decode(latents), -1.0, 1.0)


def sampling_problems(settings: ml_collections.ConfigDict, run: RunInfo) -> list[str]:
    """Problems with the sampling settings an evaluator shares (cfg_scale, sampler, respacing)."""
    problems = []
    if settings.sampler not in engine.SAMPLERS:
        problems.append(f"sampler {settings.sampler!r} is not one of {engine.SAMPLERS}")
    try:
        run.chain(settings.respacing)
    except (ValueError, TypeError) as err:
        problems.append(f"respacing {settings.respacing!r}: {err}")
    if not np.isfinite(settings.cfg_scale) or settings.cfg_scale < 1.0:
        problems.append(f"cfg_scale must be a finite number >= 1 (1 = no guidance), got {settings.cfg_scale}")
    return problems


def check(problems: list[str]) -> None:
    """Raise one ValueError listing ``problems`` (an evaluator's settings), if any."""
    if problems:
        raise ValueError("; ".join(problems))


class Entry(NamedTuple):
    """One active ``config.evals`` entry."""

    name: str
    every: int
    evaluator: Any

    def due(self, step: int, last_step: int) -> bool:
        return step > 0 and (step == last_step or (self.every > 0 and step % self.every == 0))


def evaluator_types() -> list[str]:
    """The evaluator modules of this package (those defining ``Evaluator``)."""
    types = []
    for info in pkgutil.iter_modules(importlib.import_module("dit_jax.evaluators").__path__):
        if info.name not in _NOT_EVALUATORS:
            try:
                if hasattr(importlib.import_module(f"dit_jax.evaluators.{info.name}"), "Evaluator"):
                    types.append(info.name)
            except ImportError:
                continue
    return sorted(types)


def _module(kind: Any):
    if not isinstance(kind, str) or not kind.isidentifier() or kind in _NOT_EVALUATORS:
        return None
    try:
        module = importlib.import_module(f"dit_jax.evaluators.{kind}")
    except ModuleNotFoundError as err:
        if err.name == f"dit_jax.evaluators.{kind}":
            return None
        raise
    return module if hasattr(module, "Evaluator") else None


def create_evaluators(evals: ml_collections.ConfigDict, run: RunInfo) -> list[Entry]:
    """The active entries of ``config.evals``, each built (and its settings checked) before training starts.

    Raises one ValueError naming every bad entry and field.
    """
    entries, problems = [], []
    for name, entry in sorted((evals or {}).items()):
        where = f"evals.{name}"
        if not isinstance(entry, (dict, ml_collections.ConfigDict)):
            problems.append(f"{where} must be a dict with type and every, got {entry!r}")
            continue
        module = _module(entry.get("type"))
        if module is None:
            problems.append(f"{where}.type={entry.get('type')!r} is not an evaluator: use one of "
                            f"{evaluator_types()} (a module dit_jax/evaluators/<type>.py defining Evaluator)")
            continue
        every = entry.get("every")
        if not isinstance(every, int) or isinstance(every, bool) or every < -1:
            problems.append(f"{where}.every must be an integer: N > 0 (every N steps and at the last step), "
                            f"0 (the last step only) or -1 (off); got {every!r}")
            continue
        unknown = sorted(set(entry.keys()) - set(COMMON_FIELDS) - set(module.DEFAULTS))
        if unknown:
            problems.append(f"{where}: unknown field(s) {unknown}; a {entry['type']} evaluator takes "
                            f"{sorted(module.DEFAULTS)}")
            continue
        if every == -1:
            continue
        settings = ml_collections.ConfigDict({**module.DEFAULTS, **{k: v for k, v in entry.items()
                                                                     if k not in COMMON_FIELDS}})
        try:
            evaluator = module.Evaluator(settings, run, name=name)
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"{where}: {err}")
            continue
        if getattr(evaluator, "off", None):
            from absl import logging
            logging.info("%s is off: %s", where, evaluator.off)
            continue
        entries.append(Entry(name, every, evaluator))
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    return entries


def run_entries(entries: list[Entry], ema: EmaModel) -> dict[str, dict[str, Any]]:
    """Run ``entries`` on ``ema`` in order; {name: result (with its ``seconds``)}.

    A stop request between or inside evaluations raises ``Interrupted`` carrying the results so far
    (``err.completed``): those are kept, the rest rerun on resume.
    """
    results: dict[str, dict[str, Any]] = {}
    for entry in entries:
        try:
            ema.raise_if_stopped()
            start = time.time()
            result = dict(entry.evaluator.run(ema))
        except Interrupted as err:
            err.completed = results
            raise
        result["seconds"] = time.time() - start
        results[entry.name] = result
    return results


def is_image(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def log_entries(results: dict[str, dict[str, Any]], step: int, writer: Any, log: Any | None) -> list[dict[str, Any]]:
    """Write evaluation results: scalars and images to TensorBoard as ``<entry>/<key>``, one
    ``metrics.jsonl`` line per entry (``{"step", "eval", key: value}``, images left out); the lines."""
    lines = []
    for name, result in results.items():
        scalars = {f"{name}/{k}": float(v) for k, v in result.items() if is_scalar(v)}
        images = {f"{name}/{k}": v[None] for k, v in result.items() if is_image(v)}
        if scalars:
            writer.write_scalars(step, scalars)
        if images:
            writer.write_images(step, images)
        line = {"step": step, "eval": name, **{k: jsonable(v) for k, v in result.items() if not is_image(v)}}
        lines.append(line)
        if log:
            log.write(json.dumps(line) + "\n")
            log.flush()
    return lines


def describe(kind: str, result: dict[str, Any], workdir: str) -> list[str]:
    """A result of evaluator type ``kind`` in words for the console: its module's ``report(result, workdir)``
    lines where it defines one, else its scalars on one line. ``result`` may be the JSON form (``summary.json``)."""
    module = _module(kind)
    if module is not None and hasattr(module, "report"):
        return module.report(result, workdir)
    return [", ".join(f"{k} {float(v):.4g}" for k, v in result.items() if is_scalar(v)) or "done"]


def jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value
