"""``python -m dit_jax.evaluate``: ADM's evaluator (Inception Score, FID, sFID, precision, recall) in JAX.

    python -m dit_jax.evaluate --reference VIRTUAL_imagenet256_labeled.npz --samples samples.npz \\
        [--inception_weights PATH] [--json OUT.json]

Both files are ADM-style ``.npz``: ``arr_0`` uint8 ``[N, H, W, 3]``; a reference may also hold
``mu, sigma, mu_s, sigma_s`` (used when present; ``arr_0`` then serves precision/recall only).
Arrays are streamed from the file in batches (a 50K x 256 x 256 sample file is never loaded
whole); on several processes each takes a contiguous share and only features are gathered.

Trust: a reference built by ``dit_jax.reference_batch`` records the SHA-256 of the Inception
weights its statistics came from; another network is refused (ADM's batches record none: a
note says so). What is computed from a reference's images is cached under the download cache,
keyed by the file's content (its zip directory's CRC-32s and sizes) and the weights' SHA-256.
``--inception_weights random:SEED`` is a smoke test with random weights, labelled not comparable.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from dit_jax import console
from dit_jax import compilation_cache, storage
from dit_jax.fid import inception, metrics
from dit_jax.fid.adm_npz import REFERENCE_NAMES, BadBatch, NpzImages, check_batch_sizes, open_reference
from dit_jax.fid.features import (CACHE_FOLDER, batch_features, check_reference_weights, feature_cache_path,
                                  read_weights, reference_features)
from dit_jax.weights import fetch

FIGURES = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
           ("recall", "Recall"))


def evaluate(reference: str, samples: str, *, inception_weights: str | None = None, batch_size: int | None = None,
             pr_float16: bool = True, split_size: int = metrics.SPLIT_SIZE, progress: bool = True,
             cache: bool = True) -> dict[str, Any]:
    """ADM's five figures for ``samples`` against ``reference``, with every setting and note (a JSON-able dict).

    ``inception_weights``: a file, a registry name or ``random:SEED`` (a smoke test). A reference whose
    statistics record other weights is refused before any image is read. ``cache``: reuse (or keep) what the
    reference's images give with these weights (``feature_cache_path``).
    """
    import jax

    started = time.time()
    samples, reference = storage.absolute(samples), fetch.locate(reference, REFERENCE_NAMES)
    sample_images = NpzImages(samples)
    ref = open_reference(reference)
    ref_stats, ref_images, _ = ref
    check_batch_sizes(len(sample_images), None if ref_images is None else len(ref_images))
    notes = []
    if ref_images is not None and ref_images.shape[1:3] != sample_images.shape[1:3]:
        notes.append(f"samples are {sample_images.shape[1]}x{sample_images.shape[2]}, the reference images "
                     f"{ref_images.shape[1]}x{ref_images.shape[2]}: allowed (both are resized to 299x299, as ADM "
                     "does), but the figures compare different resolutions")
    weights = read_weights(inception_weights)
    notes += check_reference_weights(ref, reference, weights)
    smoke_test = inception.random_seed(weights.source) is not None
    if smoke_test:
        notes.insert(0, f"random Inception weights ({weights.source}): a smoke test of the pipeline; these figures "
                        "are comparable with nothing (not with published ones, nor with any run of real weights)")
    cache_path = feature_cache_path(reference, weights.sha256) if cache and ref_images is not None else None
    cached = cache_path is not None and cache_path.exists()
    model = inception.create_inception(weights.tensors)
    features = inception.create_feature_fn(model, batch_size=batch_size)
    chunk = 256
    sample_feats = batch_features(sample_images, features, chunk=chunk, progress=progress, label="samples")
    if not np.isfinite(sample_feats["pool"]).all():
        raise BadBatch("the Inception features of the samples are not finite (NaN/inf): check the weights file")
    reference_feats = reference_features(ref, features, chunk=chunk, progress=progress, cache=cache_path)
    figures, metric_notes = metrics.compute_metrics(sample_feats, reference_feats, split_size=split_size,
                                                    pr_float16=pr_float16)
    return {
        **figures,
        "num_samples": len(sample_images),
        "num_reference_images": 0 if ref_images is None else len(ref_images),
        "notes": notes + metric_notes,
        "settings": {
            "samples": samples, "reference": reference,
            "sample_shape": list(sample_images.shape),
            "reference_statistics": "precomputed mu/sigma/mu_s/sigma_s" if ref_stats else "from arr_0",
            "inception_weights": weights.source, "inception_weights_sha256": weights.sha256,
            "smoke_test_random_weights": smoke_test,
            "reference_features": ("none (no arr_0)" if cache_path is None and ref_images is None else
                                   "computed (cache off)" if cache_path is None else
                                   f"{'read from' if cached else 'computed, kept in'} {cache_path}"),
            "resize": "TF1 ResizeBilinear to 299x299, no half-pixel centres", "normalisation": "(x - 128) / 128",
            "precision": "float32, precision=HIGHEST", "fd_sqrt": "scipy.linalg.sqrtm, float64",
            "is_split_size": split_size, "pr_k": metrics.PR_K, "pr_block": metrics.PR_BLOCK,
            "pr_distances": "float16" if pr_float16 else "float32", "batch_size": batch_size,
            "devices": jax.device_count(), "processes": jax.process_count(), "platform": jax.devices()[0].platform,
        },
        "seconds": round(time.time() - started, 1),
    }


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("reference", None, "reference batch .npz: a path, one built by python -m "
                        f"dit_jax.reference_batch, or ADM's by name ({', '.join(REFERENCE_NAMES)}; fetched into the "
                        "cache)", required=True)
    flags.DEFINE_string("samples", None, "sample batch .npz: arr_0 uint8 [N, H, W, 3]", required=True)
    flags.DEFINE_string("inception_weights", None, "the FID InceptionV3 weights: pytorch-fid's or torch-fidelity's "
                        f".pth, a .safetensors conversion, or a registry name (default {inception.DEFAULT_WEIGHTS}, "
                        "fetched into the cache); random:SEED = random weights, a smoke test whose figures are "
                        "comparable with nothing")
    flags.DEFINE_bool("reference_cache", True, "reuse what the reference's images give with these weights, kept "
                      f"in $DIT_JAX_CACHE/{CACHE_FOLDER}/ (keyed by the file's content and the weights' SHA-256)")
    flags.DEFINE_string("json", None, "also write the figures, settings and notes to this JSON file")
    flags.DEFINE_integer("batch_size", None, "global Inception batch (default 32 per device)")
    flags.DEFINE_bool("pr_float32", False, "precision/recall distances in float32 instead of ADM's float16")
    flags.DEFINE_string("save_safetensors", None, "convert --inception_weights to this .safetensors file and exit")
    compilation_cache.define_flag()


def main(argv: list[str]) -> None:
    console.quiet_libraries()  # library chatter at WARNING unless --verbosity asks
    from absl import flags

    from dit_jax import sharding

    del argv
    f = flags.FLAGS
    compilation_cache.enable(f.compilation_cache)
    sharding.initialize_distributed()
    try:
        if f.save_safetensors:
            print(f"wrote {inception.save_safetensors(f.inception_weights, f.save_safetensors)}")
            return
        result = evaluate(f.reference, f.samples, inception_weights=f.inception_weights, batch_size=f.batch_size,
                          pr_float16=not f.pr_float32, cache=f.reference_cache)
    except (BadBatch, ValueError, FileNotFoundError, fetch.DownloadError) as err:  # the user's to fix
        console.fail(str(err))
    if not sharding.is_main_process():
        return
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"{result['num_samples']} samples")
    for key, name in FIGURES:
        print(f"{name}: {result[key]:.6g}" if key in result else f"{name}: not computed")
    if f.json:
        storage.write_atomic(storage.absolute(f.json), json.dumps(result, indent=2))


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
