"""``class_consistency``: the CPU demo's judge (synthetic data only).

A small CNN (``dit_jax.classifier``) is trained on fresh synthetic data (with random hue
rotations, so it judges shape rather than colour) and classifies guided EMA samples of every
class: the fraction recognised as the class they were drawn for is the *class consistency*
(chance is 1 / classes). The judge is trained once per run, at its first evaluation.

It also reports an FID in the judge's feature space (``Classifier.features``, 128 values):
the samples against ``heldout_examples`` fresh real images of the sampled classes (``fid``),
beside the same distance between two real sets of those sizes (``fid_floor``, what a perfect
model would score with this many samples). The console shows it only beside that floor, in words
(``report``): alone, a "demo FID" of 800 means nothing to a reader.
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections
import numpy as np

from dit_jax import classifier, synthetic
from dit_jax.evaluators import common
from dit_jax.fid import metrics
from dit_jax.sampling import image_grid
from dit_jax.sampling.engine import PICTURE_CFG_SCALE

DEFAULTS = dict(
    per_class=30,                 # samples of each class judged
    num_classes=10,               # the first this many classes
    cfg_scale=PICTURE_CFG_SCALE,  # the official sample.py's guidance for pictures
    sampler="ddpm",
    respacing="250",
    classifier_examples=10_000,   # synthetic examples the judge is trained on
    classifier_steps=400,         # its Adam steps (batch 128)
    heldout_examples=2_000,       # fresh synthetic examples its accuracy is measured on
)


class Evaluator:
    def __init__(self, settings: ml_collections.ConfigDict, run: common.RunInfo, *, name: str):
        problems = common.sampling_problems(settings, run)
        if run.data_source != "synthetic":
            problems.append(f"the judge is trained on the package's synthetic data; this run trains on "
                            f"{run.data_source} (use a grid or fid evaluator)")
        for field in ("per_class", "num_classes", "classifier_examples", "classifier_steps", "heldout_examples"):
            if settings[field] < 1:
                problems.append(f"{field} must be >= 1, got {settings[field]}")
        common.check(problems)
        self.settings, self.run_info = settings, run
        self.decoder = common.Decoder(run)
        self.labels = np.repeat(np.arange(min(settings.num_classes, run.num_classes), dtype=np.int32),
                                settings.per_class)
        self._judge: tuple[classifier.Classifier, tuple[np.ndarray, np.ndarray], dict[str, Any]] | None = None

    def _trained_judge(self) -> tuple[classifier.Classifier, tuple[np.ndarray, np.ndarray], dict[str, Any]]:
        """The judge (trained on first use), the real images' statistics in its feature space, its figures."""
        if self._judge is None:
            start, s, run = time.time(), self.settings, self.run_info
            k, size = run.num_classes, run.image_size
            images, targets = synthetic.make_examples(s.classifier_examples, num_classes=k, image_size=size,
                                                 seed=run.seed + 1000)
            judge = classifier.train_classifier(image_grid.to_model_range(images), targets, num_classes=k,
                                                steps=s.classifier_steps, seed=run.seed)
            held_images, held_labels = synthetic.make_examples(s.heldout_examples, num_classes=k, image_size=size,
                                                          seed=run.seed + 2000)
            held = image_grid.to_model_range(held_images)
            sampled = held_labels < len(np.unique(self.labels))
            reference = metrics.statistics(classifier.features(judge, held[sampled]))
            held[1::2] = held[1::2, :, ::-1]  # both orientations: the judge accepts either (data.random_flip)
            # The floor: a second real set with the samples' labels, against the same reference.
            floor_images, floor_labels = synthetic.make_examples(len(self.labels) * k, num_classes=k, image_size=size,
                                                            seed=run.seed + 3000)
            floor = np.concatenate([floor_images[floor_labels == c][:s.per_class] for c in np.unique(self.labels)])
            floor_stats = metrics.statistics(classifier.features(judge, image_grid.to_model_range(floor)))
            self._judge = judge, reference, {
                "heldout_accuracy": classifier.accuracy(judge, held, held_labels),
                "fid_floor": metrics.frechet_distance(*floor_stats, *reference),
                "judge_seconds": time.time() - start}
        return self._judge

    def run(self, ema: common.EmaModel) -> dict[str, Any]:
        s = self.settings
        images = ema.images(self.labels, decoder=self.decoder, seed=self.run_info.seed + 1, cfg_scale=s.cfg_scale,
                            sampler=s.sampler, respacing=s.respacing)
        judge, reference, figures = self._trained_judge()
        x = image_grid.to_model_range(images)
        predicted = classifier.predict(judge, x)
        return {
            "class_consistency": float(np.mean(predicted == self.labels)),
            "fid": metrics.frechet_distance(*metrics.statistics(classifier.features(judge, x)), *reference),
            "per_class": [float(np.mean(predicted[self.labels == c] == c)) for c in np.unique(self.labels)],
            "chance": 1.0 / self.run_info.num_classes,
            **figures,
        }


# A demo FID within this factor of its floor reads as "as varied as the data" (two real sets differ by the floor);
# above it, samples this consistent are recognisable, so the gap is their variety.
CLOSE_TO_FLOOR = 2.0
RECOGNISABLE = 0.9


def report(result: dict[str, Any], workdir: str) -> list[str]:
    """The judge's verdict in words: the consistency against chance, each class by name, and the demo FID beside
    its floor (``fid_floor``) with what the gap means."""
    del workdir  # nothing written
    names = synthetic.CLASS_NAMES
    per_class = ", ".join(f"{names[c]} {score:.2f}" for c, score in enumerate(result["per_class"]))
    fid, floor = result["fid"], result["fid_floor"]
    if fid <= CLOSE_TO_FLOOR * floor:
        verdict = "the samples vary about as much as the data"
    elif result["class_consistency"] >= RECOGNISABLE:
        verdict = "the samples are recognisable but have less variety than the data"
    else:
        verdict = "the samples have less variety than the data, or look unlike it"
    return [f"class consistency {result['class_consistency']:.3f}: the share of samples that a judge trained on real "
            f"images recognises as the class they were drawn for (chance {result['chance']:.2f}; the judge "
            f"recognises {result['heldout_accuracy']:.2%} of held-out real images)",
            f"per class: {per_class}",
            f"demo FID {fid:.3g} (lower is better; two sets of real images score {floor:.2g}): {verdict}"]
