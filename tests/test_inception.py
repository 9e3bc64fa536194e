"""The FID InceptionV3: TF1's resize bit for bit, the network against torch-fidelity's, the weight checks."""

from __future__ import annotations

import numpy as np
import pytest

from dit_jax.fid import inception
from tests.fake_images import natural_image
from tests.inception_features import torch_fidelity_features

SIZES = [(32, 32), (64, 64), (256, 256), (512, 512), (37, 91), (300, 200)]


@pytest.fixture(scope="module")
def smooth_images():
    rng = np.random.default_rng(0)
    return {size: natural_image(rng, *size)[None].astype(np.float32) for size in SIZES}


def test_resize_is_tf1_resize_bilinear_bit_for_bit(smooth_images):
    import tensorflow as tf

    for size, images in smooth_images.items():
        expected = tf.raw_ops.ResizeBilinear(images=images, size=[299, 299], align_corners=False,
                                             half_pixel_centers=False).numpy()
        np.testing.assert_array_equal(np.asarray(inception.resize_bilinear_tf1(images)), expected, err_msg=str(size))


def test_jax_image_resize_is_not_the_inception_resize(smooth_images):
    """The control: jax.image.resize (half-pixel centres, antialiasing) is off by grey levels."""
    import jax

    import tensorflow as tf

    for size, images in smooth_images.items():
        expected = tf.raw_ops.ResizeBilinear(images=images, size=[299, 299], align_corners=False,
                                             half_pixel_centers=False).numpy()
        other = np.asarray(jax.image.resize(images, (1, 299, 299, 3), "bilinear"))
        assert np.abs(other - expected).max() > 1.0, size


# ------------------------------------------------------------------ the network against torch-fidelity

@pytest.fixture(scope="module")
def features(inception_state):
    """torch-fidelity's and our features of 3 images (64x80: resized inside) from the same random weights;
    ours through the sharded feature function on 8 devices in a padded batch of 8."""
    rng = np.random.default_rng(1)
    images = np.stack([natural_image(rng, 64, 80) for _ in range(3)])
    torch_feats = torch_fidelity_features(inception_state, images)
    model = inception.create_inception({k: v.numpy() for k, v in inception_state.items()})
    ours = inception.create_feature_fn(model, batch_size=8)(images)
    return torch_feats, ours


def _hwc_first7(nchw: np.ndarray) -> np.ndarray:
    return nchw.transpose(0, 2, 3, 1)[..., :7].reshape(len(nchw), -1)


def test_network_matches_torch_fidelity(features):
    ref, ours = features
    assert {k: v.shape for k, v in ours.items()} == {"pool": (3, 2048), "spatial": (3, 2023), "logits": (3, 1008)}
    assert all(v.dtype == np.float32 for v in ours.values())
    for name, expected in (("pool", ref["pool"]), ("logits", ref["logits"]), ("spatial", _hwc_first7(ref["Mixed_6d"]))):
        assert np.abs(expected).max() > 1.0  # healthy activations, not a trivially small signal
        np.testing.assert_allclose(ours[name], expected, atol=1e-3, rtol=0, err_msg=name)


def test_spatial_features_are_mixed_6d_in_hwc_order(features):
    """The sFID features are Mixed_6d's 1x1 branch, first 7 channels, H-W-C: NCHW order or Mixed_6e would fail."""
    ref, ours = features
    nchw_order = ref["Mixed_6d"][:, :7].reshape(3, -1)
    mixed_6e = _hwc_first7(ref["Mixed_6e"])
    for wrong in (nchw_order, mixed_6e):
        assert np.abs(ours["spatial"] - wrong).max() > 0.1


def test_feature_fn_checks_its_input(inception_state):
    model = inception.create_inception({k: v.numpy() for k, v in inception_state.items()})
    features = inception.create_feature_fn(model, batch_size=8)
    with pytest.raises(ValueError, match="uint8"):
        features(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        features(np.zeros((2, 3, 32, 32), np.uint8))
    empty = features(np.zeros((0, 32, 32, 3), np.uint8))
    assert empty["pool"].shape == (0, 2048)


@pytest.mark.slow
def test_network_matches_torch_fidelity_in_float64(inception_state):
    import jax

    """At 299x299 (no resize: torch-fidelity resizes in float64, TF in float32) the networks agree to float32
    rounding (torch-fidelity returns pool and logits as float32; the hooked Mixed_6d output stays float64)."""
    rng = np.random.default_rng(2)
    images = np.stack([natural_image(rng, 299, 299) for _ in range(2)])
    ref = torch_fidelity_features(inception_state, images, dtype="float64")
    with jax.enable_x64(True):
        model = inception.create_inception({k: v.numpy() for k, v in inception_state.items()}, dtype=np.float64)
        ours = {k: np.asarray(v) for k, v in jax.jit(lambda m, x: m(x))(model, images).items()}
    assert ours["pool"].dtype == np.float64
    np.testing.assert_allclose(ours["spatial"], _hwc_first7(ref["Mixed_6d"]), atol=1e-9, rtol=0)
    for name in ("pool", "logits"):
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-6, rtol=1e-7, err_msg=name)


# ------------------------------------------------------------------ weights

def test_weights_are_checked_name_by_name_and_shape_by_shape():
    expected = inception.expected_weights()
    assert len(expected) == 472 and expected["fc.weight"] == (1008, 2048)
    assert expected["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    tensors = {k: np.zeros(v, np.float32) for k, v in expected.items()}
    tensors["Mixed_6d.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)  # torch's extra: ignored
    inception.check_weights(tensors, "ok.pth")
    bad = dict(tensors)
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ValueError) as err:
        inception.check_weights(bad, "bad.pth")
    message = str(err.value)
    for part in ("bad.pth", "missing Mixed_7c.branch_pool.bn.running_var", "fc.weight: shape (1000, 2048)",
                 "unexpected AuxLogits.fc.weight"):
        assert part in message


def test_weights_from_pth_and_safetensors(tmp_path, inception_state):
    import torch

    torch.save(inception_state, tmp_path / "w.pth")
    out = inception.save_safetensors(tmp_path / "w.pth", tmp_path / "w.safetensors")
    tensors, source = inception.read_inception_weights(out)
    assert source == str(tmp_path / "w.safetensors")
    for name, value in inception_state.items():
        np.testing.assert_array_equal(tensors[name], value.numpy())
    (tmp_path / "bad.safetensors").write_bytes(b"not a weight file")
    with pytest.raises(Exception, match="bad.safetensors|header|deserial"):
        inception.read_inception_weights(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        inception.read_inception_weights(tmp_path / "missing.pth")
    # The weights' hash is the tensors', the same in either container (their files' hashes differ).
    from_pth = inception.weights_sha256(inception.read_inception_weights(tmp_path / "w.pth")[0])
    assert from_pth == inception.weights_sha256(tensors) == inception.weights_sha256(
        {k: v.numpy() for k, v in inception_state.items()})
    tensors["fc.bias"] = tensors["fc.bias"] + 1e-7
    assert inception.weights_sha256(tensors) != from_pth


def test_random_weights_by_seed():
    tensors, source = inception.read_inception_weights("random:3")
    assert source == "random:3" and set(tensors) == set(inception.expected_weights())
    assert inception.weights_sha256(tensors) == inception.weights_sha256(inception.random_weights(3))
    assert inception.weights_sha256(tensors) != inception.weights_sha256(inception.random_weights(4))
    with pytest.raises(ValueError, match="random:SEED with a whole number"):
        inception.read_inception_weights("random:x")
