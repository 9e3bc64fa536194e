"""``fid``: ADM's five figures (FID, sFID, Inception Score, precision, recall) of N EMA samples.

``num_samples`` images (labels uniform at random as DiT's ``sample_ddp.py`` draws them; sample
``j`` depends only on (``seed``, ``j``)) come from the sharded sampling engine
(``dit_jax.sampling.engine``), decoded through the latents' VAE on a latent run. Block by block they go
through the FID InceptionV3 (``dit_jax.fid.inception``), keeping only features, and are
compared with ``reference`` (ADM's ``VIRTUAL_imagenet256_labeled.npz``, or a batch built by
``python -m dit_jax.reference_batch``; read by ``dit_jax.fid.adm_npz``) by ``dit_jax.fid.metrics``.
The metric names carry the settings: ``fid10k_cfg1.5``, ``sfid10k_cfg1.5``, ``is10k_cfg1.5``,
``precision10k_cfg1.5``, ``recall10k_cfg1.5`` (with e.g. ``_ddim50`` when the chain is not the paper's DDPM-250).

As in ``python -m dit_jax.evaluate`` (the same functions of ``dit_jax.fid.features``): a reference
whose statistics record other Inception weights (their SHA-256) is refused before training, and what
the reference's images give with these weights is kept in the download cache, so the next run (or
``evaluate``) skips them.

Off while ``reference`` is "" (the paper configs name no file: pass
``--config.evals.fid.reference=PATH``, or ADM's batch by name, e.g. ``VIRTUAL_imagenet256_labeled.npz``,
fetched into the download cache when the run starts).
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from dit_jax import console
from dit_jax.evaluators import common
from dit_jax.fid import adm_npz, features, inception, metrics
from dit_jax.sampling import engine
from dit_jax.weights import fetch

DEFAULTS = dict(
    num_samples=10_000,     # samples scored (the paper's FID uses 50,000)
    cfg_scale=engine.FID_CFG_SCALE,  # the paper's FID guidance (1.0 = unguided)
    sampler="ddpm",
    respacing="250",        # the paper's 250 DDPM steps
    reference="",           # the reference batch (.npz path or ADM's registry name); "" = this evaluator is off
    inception_weights="",   # the FID InceptionV3 weights (.pth/.safetensors); "" = the registry's, fetched
    vae="",                 # latent runs: "" = the VAE named in the latents' metadata.json
    per_device_batch=32,    # samples per device per engine call
    seed=0,                 # labels and noise
)
# compute_metrics' names -> the short names of the logged metrics.
_SHORT = {"fid": "fid", "sfid": "sfid", "inception_score": "is", "precision": "precision", "recall": "recall"}


def metric_suffix(settings: ml_collections.ConfigDict) -> str:
    """``10k_cfg1.5`` (+ ``_<chain>`` unless DDPM-250): what the figures were computed with."""
    n = settings.num_samples
    text = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    text += f"_cfg{settings.cfg_scale:g}"
    if (settings.sampler, settings.respacing) != ("ddpm", "250"):
        chain = settings.respacing.replace(",", "-")
        text += "_" + (chain if chain.startswith(settings.sampler) else settings.sampler + chain)
    return text


class Evaluator:
    def __init__(self, settings: ml_collections.ConfigDict, run: common.RunInfo, *, name: str):
        problems = common.sampling_problems(settings, run)
        for field in ("num_samples", "per_device_batch"):
            if settings[field] < 1:
                problems.append(f"{field} must be >= 1, got {settings[field]}")
        common.check(problems)
        self.settings, self.run_info, self.name = settings, run, name
        self.off = None if settings.reference else ("no reference batch: set reference to a .npz (ADM's "
                                                    "VIRTUAL_imagenet256_labeled.npz or the output of `python -m "
                                                    "dit_jax.reference_batch`) to score FID during training")
        if self.off:
            return
        vae = common.vae_name(run, settings.vae)
        self.vae = common.load_vae(vae) if vae else None
        weights = features.read_weights(settings.inception_weights or None)
        try:
            # Checked now, as evaluate checks them: a bad file, or statistics of other Inception weights, are named
            # before training; a registry name is fetched now.
            path = fetch.locate(settings.reference, adm_npz.REFERENCE_NAMES)
            self._reference = adm_npz.open_reference(path)
            self.notes = features.check_reference_weights(self._reference, path, weights)
        except adm_npz.BadBatch as err:
            raise ValueError(f"reference: {err}") from err
        # What the reference's images give with these weights, kept in the download cache (as evaluate keeps it).
        self._cache = None if self._reference.images is None else features.feature_cache_path(path, weights.sha256)
        self.features = inception.create_feature_fn(inception.create_inception(weights.tensors))
        self._reference_features: dict[str, Any] | None = None

    def run(self, ema: common.EmaModel) -> dict[str, Any]:
        s = self.settings
        if self._reference_features is None:  # the reference images' features, computed once
            t0 = time.time()
            logging.info("%s: the Inception features of the reference batch (once per run)", self.name)
            self._reference_features = features.reference_features(self._reference, self.features, progress=False,
                                                                    cache=self._cache)
            logging.info("%s: reference features done in %.0f s%s", self.name, time.time() - t0,
                         "" if self._cache is None else f" (cache: {self._cache})")
        labels = engine.random_labels(s.seed, s.num_samples, self.run_info.num_classes)
        image_sampler = engine.create_image_sampler(ema.model, self.run_info.chain(s.respacing), cfg_scale=s.cfg_scale,
                                                    sampler=s.sampler, vae=self.vae, per_device_batch=s.per_device_batch)
        feats: dict[str, list[np.ndarray]] = {}
        progress = console.ProgressLog(f"{self.name} at step {ema.step}: sampled and featurised", len(labels), "images")
        for block in engine.iterate_blocks(image_sampler, labels, seed=s.seed):
            for key, value in self.features(block.images).items():
                feats.setdefault(key, []).append(value)
            progress.update(len(block.images))
            ema.raise_if_stopped()
        figures, notes = metrics.compute_metrics({k: np.concatenate(v) for k, v in feats.items()},
                                                 self._reference_features)
        suffix = metric_suffix(s)
        return {**{f"{_SHORT[k]}{suffix}": v for k, v in figures.items()}, "notes": self.notes + notes,
                "reference": s.reference}
