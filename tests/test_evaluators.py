"""The evaluators of ``config.evals``: the registry, grids of pixels and of VAE-decoded latents, the demo's
class consistency, validation before training, and a stop (SIGTERM) during an evaluation."""

from __future__ import annotations

import json
import logging
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dit_jax import latents, synthetic, train, vae
from dit_jax.evaluators import class_consistency, common, fid, grid
from dit_jax.fid import features, inception
from dit_jax.models import DiT
from dit_jax.sampling import engine, image_grid
from dit_jax.weights import fetch
from tests.inception_features import fake_features
from tests.run_files import read_log
from tests.tiny_models import latent_config, tiny_train_config as tiny_config


def run_info(tmp_path, **fields) -> common.RunInfo:
    base = dict(workdir=str(tmp_path), seed=0, last_step=10, num_classes=4, data_source="synthetic", image_size=16,
                latents_metadata=None, noise_schedule="linear", diffusion_steps=1000, learn_sigma=True)
    return common.RunInfo(**{**base, **fields})


def random_dit(*, input_size: int, in_channels: int, num_classes: int) -> DiT:
    """A 1-block DiT with non-zero output layers, so samples depend on the labels."""
    model = DiT(input_size=input_size, patch_size=2, in_channels=in_channels, hidden_size=32, depth=1, num_heads=2,
                num_classes=num_classes, rngs=nnx.Rngs(0))
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        var[...] = 0.05 * jax.random.normal(jax.random.key(i), var[...].shape)
    return model


def settings(module, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**module.DEFAULTS, **fields})


def grid_cells(path, rows: int, cols: int, size: int) -> np.ndarray:
    """The images of a ``make_grid`` PNG (pad 2, upscaled 2x) as uint8 [rows * cols, size, size, 3]."""
    image = np.asarray(Image.open(path).convert("RGB"))[::2, ::2]
    assert image.shape == (rows * (size + 2) + 2, cols * (size + 2) + 2, 3)
    return np.stack([image[2 + r * (size + 2):2 + r * (size + 2) + size, 2 + c * (size + 2):2 + c * (size + 2) + size]
                     for r in range(rows) for c in range(cols)])


def test_unknown_types_and_fields_are_named_with_the_choices(tmp_path):
    assert {"grid", "class_consistency"} <= set(common.evaluator_types()) and "common" not in common.evaluator_types()
    evals = ml_collections.ConfigDict({
        "a": {"type": "nope", "every": 0}, "b": {"type": "common", "every": 0},
        "c": {"type": "grid", "every": 0, "per_clas": 3}, "d": {"type": "grid", "every": "10"},
        "e": {"type": "grid", "every": 0, "cfg_scale": 0.5}})
    with pytest.raises(ValueError) as err:
        common.create_evaluators(evals, run_info(tmp_path))
    message = str(err.value)
    assert "evals.a.type='nope' is not an evaluator: use one of [" in message and "'grid'" in message
    assert "evals.b.type='common' is not an evaluator" in message
    assert "evals.c: unknown field(s) ['per_clas']; a grid evaluator takes [" in message
    assert "evals.d.every must be an integer" in message
    assert "evals.e: cfg_scale must be a finite number >= 1" in message


def test_every_sets_when_an_entry_runs(tmp_path):
    evals = ml_collections.ConfigDict({"off": {"type": "grid", "every": -1}, "end": {"type": "grid", "every": 0},
                                       "often": {"type": "grid", "every": 4}})
    entries = {e.name: e for e in common.create_evaluators(evals, run_info(tmp_path, last_step=10))}
    assert sorted(entries) == ["end", "often"]  # every=-1: not built at all
    assert [s for s in range(11) if entries["end"].due(s, 10)] == [10]
    assert [s for s in range(11) if entries["often"].due(s, 10)] == [4, 8, 10]


def test_a_bad_eval_field_stops_the_run_before_training(tmp_path):
    c = tiny_config()
    c.evals.samples.respacing = "ddim0"
    with pytest.raises(ValueError, match=r"evals.samples: respacing 'ddim0'.*positive integer"):
        train.train_and_evaluate(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_pixel_grid_holds_the_guided_samples_and_shares_them(tmp_path, monkeypatch):
    run = run_info(tmp_path)
    evaluator = grid.Evaluator(settings(grid, per_class=3, num_classes=2, respacing="3"), run, name="pics")
    calls, generate = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    ema = common.EmaModel(random_dit(input_size=16, in_channels=3, num_classes=4), step=5, run=run)
    result = evaluator.run(ema)
    assert result["png"] == os.path.join("pics", "step_00000005.png") and not (tmp_path / "pics.png").exists()
    labels = np.repeat(np.arange(2), 3)
    samples = ema.samples(labels, seed=1, cfg_scale=4.0, sampler="ddpm", respacing="3")
    assert len(calls) == 1  # the second request is the first one's samples
    expected = image_grid.from_model_range(samples)
    np.testing.assert_array_equal(grid_cells(tmp_path / result["png"], 2, 3, 16), expected)
    assert result["grid"].shape == np.asarray(Image.open(tmp_path / result["png"])).shape
    assert not np.array_equal(expected[0], expected[3])  # rows are classes
    # The last step also writes WORKDIR/<name>.png.
    assert evaluator.run(common.EmaModel(ema.model, step=10, run=run))["png"] == "pics.png"
    assert (tmp_path / "pics.png").exists() and (tmp_path / "pics" / "step_00000010.png").exists()


def test_latent_grid_is_decoded_through_the_vae_the_latents_name(tiny_latents_dir, tiny_vae_dir, tmp_path):
    metadata = latents.read_metadata(str(tiny_latents_dir))
    assert metadata["vae"] == str(tiny_vae_dir)
    run = run_info(tmp_path, data_source="latents", latents_metadata=metadata, num_classes=3)
    evaluator = grid.Evaluator(settings(grid, per_class=2, num_classes=3, respacing="2"), run, name="samples")
    ema = common.EmaModel(random_dit(input_size=8, in_channels=4, num_classes=3), step=10, run=run)
    result = evaluator.run(ema)
    assert result["png"] == "samples.png" and result["decoder"] == str(tiny_vae_dir)
    cells = grid_cells(tmp_path / "samples.png", 3, 2, 16)  # 16x16 pixels, not the 8x8x4 latents
    scaled = ema.samples(np.repeat(np.arange(3), 2), seed=1, cfg_scale=4.0, sampler="ddpm", respacing="2")
    decoder = vae.load_vae(str(tiny_vae_dir))
    expected = image_grid.from_model_range(np.asarray(decoder.decode(scaled / metadata["scale_factor"])))
    assert np.abs(cells.astype(int) - expected).max() <= 1  # jitted vs eager float rounding
    # The latents are unscaled first (this random VAE's GroupNorms make it nearly scale-invariant, hence a
    # comparison of mismatch rates rather than of values).
    unscaled = image_grid.from_model_range(np.asarray(decoder.decode(scaled)))
    assert np.mean(cells != expected) < 0.05 < np.mean(cells != unscaled)


@pytest.mark.slow
def test_a_latent_run_writes_its_decoded_samples_png(tiny_latents_dir, tiny_vae_dir, tmp_path):
    c = latent_config(str(tiny_latents_dir))
    c.train.steps = 2
    c.evals.samples.update(every=0, per_class=1, respacing="2")
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["evals"]["samples"]["png"] == "samples.png"
    assert summary["evals"]["samples"]["decoder"] == str(tiny_vae_dir)
    grid_cells(tmp_path / "samples.png", 3, 1, 16)
    assert [(h["step"], h["eval"]) for h in read_log(tmp_path, evals=True)] == [(2, "samples")]


def test_a_missing_vae_or_a_judge_on_latents_is_named_before_training(tiny_latents_dir, tmp_path):
    c = latent_config(str(tiny_latents_dir))
    c.evals.samples.update(every=0, vae=str(tmp_path / "no_such_vae"))
    c.evals.class_consistency.every = 0
    with pytest.raises(ValueError) as err:
        train.train_and_evaluate(c, str(tmp_path))
    assert "evals.samples: VAE" in str(err.value) and "no_such_vae" in str(err.value)
    assert "evals.class_consistency: the judge is trained on the package's synthetic data" in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


class RealImages(common.EmaModel):
    """An "EMA model" whose samples are real synthetic images of the class ``shift`` after the requested one."""

    shift = 0

    def samples(self, labels, **_):
        images, drawn = synthetic.make_examples(len(labels) * 4, num_classes=self.run.num_classes, image_size=16, seed=9)
        wanted = (np.asarray(labels) + self.shift) % self.run.num_classes
        seen = np.zeros(self.run.num_classes, int)
        picks = []
        for y in wanted:  # a different image for every sample
            picks.append(np.flatnonzero(drawn == y)[seen[y]])
            seen[y] += 1
        return image_grid.to_model_range(images[picks])


def test_class_consistency_is_the_judges_agreement_with_the_labels(tmp_path):
    run = run_info(tmp_path)
    evaluator = class_consistency.Evaluator(
        settings(class_consistency, per_class=10, num_classes=4, classifier_examples=1000, classifier_steps=100,
                 heldout_examples=200),
        run, name="class_consistency")
    right = evaluator.run(RealImages(model=None, step=10, run=run))
    assert right["heldout_accuracy"] > 0.9 and right["chance"] == 0.25
    assert right["class_consistency"] > 0.9 and len(right["per_class"]) == 4
    assert right["class_consistency"] == pytest.approx(np.mean(right["per_class"]))
    # FID in the judge's feature space: real images of the right classes score about the floor.
    assert 0 < right["fid_floor"] and right["fid"] < 3 * right["fid_floor"]
    wrong = RealImages(model=None, step=10, run=run)
    wrong.shift = 1  # every image is of the next class
    assert evaluator.run(wrong)["class_consistency"] < 0.1
    one_class = RealImages(model=None, step=10, run=run)
    one_class.samples = lambda labels, **_: RealImages.samples(one_class, np.zeros_like(labels))
    varied, uniform = right, evaluator.run(one_class)
    assert uniform["fid"] > 3 * right["fid_floor"]  # no diversity: far from the real images
    # In words, the demo FID always beside its floor: real images vary as much as the data, one class's do not.
    for result, verdict in [(varied, "the samples vary about as much as the data"),
                            (uniform, "the samples have less variety than the data, or look unlike it")]:
        consistency, per_class, fid_line = class_consistency.report(result, str(tmp_path))
        assert consistency.startswith(f"class consistency {result['class_consistency']:.3f}: the share of samples ")
        assert per_class.startswith(f"per class: disc {result['per_class'][0]:.2f}, square ")
        assert fid_line == (f"demo FID {result['fid']:.3g} (lower is better; two sets of real images score "
                            f"{result['fid_floor']:.2g}): {verdict}")


@pytest.mark.slow  # two training runs with evaluations
def test_sigterm_during_the_evaluations_checkpoints_and_reruns_them_on_resume(tmp_path, monkeypatch):
    c = tiny_config()
    c.train.update(steps=8, checkpoint_every=100)
    c.evals.samples.update(every=4, per_class=1, num_classes=2, respacing="2")
    c.evals.second = dict(type="grid", every=4, per_class=1, num_classes=2, respacing="2")
    original = grid.Evaluator.run

    def run_then_sigterm(self, ema):
        result = original(self, ema)
        if self.name == "samples" and ema.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: a stop request during the evaluations
        return result

    monkeypatch.setattr(grid.Evaluator, "run", run_then_sigterm)
    assert train.train_and_evaluate(c, str(tmp_path)) == {"preempted_at_step": 4, "stop_signal": signal.SIGTERM}
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4]
    assert [(h["step"], h["eval"]) for h in read_log(tmp_path, evals=True)] == [(4, "samples")]
    assert not (tmp_path / "second").exists()

    monkeypatch.setattr(grid.Evaluator, "run", original)
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["resumed_from_step"] == 4
    # The interrupted evaluation ran on resume at its own step, then training went on to the last step.
    assert [(h["step"], h["eval"]) for h in read_log(tmp_path, evals=True)] == [
        (4, "samples"), (4, "second"), (8, "samples"), (8, "second")]
    assert (tmp_path / "second" / "step_00000004.png").exists() and (tmp_path / "second.png").exists()
    assert [h["step"] for h in read_log(tmp_path)] == [5, 8]
    assert sorted(summary["evals"]) == ["samples", "second"]
    assert json.loads((tmp_path / "summary.json").read_text())["evals"]["second"]["png"] == "second.png"


FAKE_WEIGHTS = features.InceptionWeights({}, "fake_inception.pth", "f" * 64)


@pytest.fixture
def fake_inception(monkeypatch, tmp_path):
    """The stand-in network (``fake_features``) as the weights ``FAKE_WEIGHTS``; the download cache in tmp_path."""
    monkeypatch.setattr(fid.features, "read_weights", lambda weights: FAKE_WEIGHTS)
    monkeypatch.setattr(fid.inception, "create_inception", lambda weights=None, **_: None)
    monkeypatch.setattr(fid.inception, "create_feature_fn", lambda model, **_: fake_features)
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))


def write_reference(path, n: int = 24, size: int = 16):
    images, _ = synthetic.make_examples(n, num_classes=4, image_size=size, seed=5)
    np.savez(path, arr_0=images)
    return path


def test_fid_metric_names_carry_the_settings():
    s = settings(fid, num_samples=10_000, cfg_scale=1.5)
    assert fid.metric_suffix(s) == "10k_cfg1.5"
    s.update(num_samples=500, cfg_scale=1.0, sampler="ddim", respacing="ddim50")
    assert fid.metric_suffix(s) == "500_cfg1_ddim50"
    s.update(sampler="ddpm", respacing="25,10,5")
    assert fid.metric_suffix(s) == "500_cfg1_ddpm25-10-5"


def test_fid_is_off_without_a_reference_and_checks_its_fields(tmp_path):
    evals = ml_collections.ConfigDict({"fid": {"type": "fid", "every": 0, **fid.DEFAULTS}})
    assert common.create_evaluators(evals, run_info(tmp_path)) == []  # off: no reference
    evals.fid.update(reference=str(tmp_path / "missing.npz"), num_samples=0)
    with pytest.raises(ValueError) as err:
        common.create_evaluators(evals, run_info(tmp_path))
    assert "evals.fid: num_samples must be >= 1" in str(err.value)


def test_fid_fetches_a_reference_named_by_the_registry(tmp_path, fake_inception, file_server, monkeypatch):
    file_server.files["/VIRTUAL_imagenet256_labeled.npz"] = write_reference(tmp_path / "ref.npz", n=6).read_bytes()
    monkeypatch.setenv(fetch.MIRROR_ENV, file_server.url)
    monkeypatch.delenv(fetch.OFFLINE_ENV, raising=False)
    evaluator = fid.Evaluator(settings(fid, reference="VIRTUAL_imagenet256_labeled.npz"), run_info(tmp_path),
                              name="fid")
    assert len(evaluator._reference.images) == 6
    assert (tmp_path / "cache" / "VIRTUAL_imagenet256_labeled.npz").is_file()


def test_fid_refuses_a_reference_of_other_weights_and_caches_the_reference_features(tmp_path, fake_inception,
                                                                                    monkeypatch):
    """As evaluate: statistics recorded with other Inception weights are refused before training, and the
    reference images' features are kept by the file's content and the weights' SHA-256."""
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.zeros(inception.POOL_DIM), sigma=np.eye(inception.POOL_DIM), metadata=np.array(json.dumps(
        {"settings": {"inception_weights": "pt_inception.pth", "inception_weights_sha256": "0" * 64}})))
    with pytest.raises(ValueError, match=r"reference: .*other.npz's statistics were computed with other Inception "
                                         r"weights \(pt_inception.pth"):
        fid.Evaluator(settings(fid, reference=str(other)), run_info(tmp_path), name="fid")
    reference, run = str(write_reference(tmp_path / "ref.npz", n=6)), run_info(tmp_path)
    fields = settings(fid, reference=reference, num_samples=4, respacing="2", per_device_batch=1)
    ema = common.EmaModel(random_dit(input_size=16, in_channels=3, num_classes=4), step=5, run=run)
    first = fid.Evaluator(fields, run, name="fid").run(ema)
    assert features.feature_cache_path(reference, FAKE_WEIGHTS.sha256).is_file()
    monkeypatch.setattr(fid.features, "batch_features", lambda *a, **k: pytest.fail("the reference featurised again"))
    second = fid.Evaluator(fields, run, name="fid").run(common.EmaModel(ema.model, step=5, run=run))
    assert second == first and np.isfinite(first["fid4_cfg1.5_ddpm2"])


@pytest.mark.slow  # a training run with a fid entry; the fid name and field tests are the fast ones
def test_fid_in_a_tiny_run_is_logged_under_its_settings(tmp_path, fake_inception, caplog):
    c = tiny_config()
    c.train.update(steps=2, log_every=1)
    c.evals.samples.every = -1
    c.evals.fid = dict(type="fid", every=0, **{**fid.DEFAULTS, "num_samples": 16, "respacing": "2",
                                                 "per_device_batch": 1,
                                                 "reference": str(write_reference(tmp_path / "ref.npz"))})
    with caplog.at_level(logging.INFO):
        summary = train.train_and_evaluate(c, str(tmp_path / "run"))
    # Progress while it runs: the reference features, then the sampled blocks (a line at least every 30 s).
    messages = [r.getMessage() for r in caplog.records]
    assert "fid: the Inception features of the reference batch (once per run)" in messages
    assert "fid at step 2: sampled and featurised: 16 images to do" in messages
    assert any(m.startswith("fid at step 2: sampled and featurised: 16/16 images, ") for m in messages)
    names = {f"{m}16_cfg1.5_ddpm2" for m in ("fid", "sfid", "is", "precision", "recall")}
    [line] = read_log(tmp_path / "run", evals=True)
    assert line["step"] == 2 and line["eval"] == "fid" and names <= set(line)
    assert all(np.isfinite(line[k]) for k in names) and line["fid16_cfg1.5_ddpm2"] > 0
    assert 0 <= line["precision16_cfg1.5_ddpm2"] <= 1 and line["is16_cfg1.5_ddpm2"] >= 1
    assert set(summary["evals"]["fid"]) >= names
