"""Image sources and preprocessing: the ADM crop exactly, RGB conversion, bad files, class numbering."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from dit_jax import images
from tests.fake_images import ODD_FILES, natural_image


def reference_crop(pil_image: Image.Image, size: int) -> np.ndarray:
    """The ADM / official DiT recipe written directly over arrays, as its paper code states it."""
    while min(*pil_image.size) >= 2 * size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


@pytest.mark.parametrize("height, width, size", [
    (375, 500, 32),   # ImageNet-like landscape: three box halvings, then bicubic
    (500, 333, 32),   # portrait, odd width
    (64, 64, 32),     # exactly 2x: one halving, then an identity-size bicubic
    (63, 100, 32),    # just under 2x: bicubic only
    (20, 30, 32),     # smaller than the target: upsampled
    (257, 1000, 16),  # extreme aspect ratio
    (375, 500, 256),  # the paper's resolution
])
def test_adm_crop_is_exactly_the_recipe(height, width, size):
    image = Image.fromarray(natural_image(np.random.default_rng(height * width), height, width))
    crop = images.adm_center_crop(image, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, reference_crop(image, size))


def encoded(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def test_non_rgb_images_are_converted_and_reported():
    rgb = natural_image(np.random.default_rng(0), 24, 30)
    cases = {"L": encoded(rgb[..., 0]), "RGBA": encoded(np.dstack([rgb, rgb[..., :1]])),
             "CMYK": encoded(rgb, "CMYK", "JPEG"), "P": encoded(rgb, "P"), "RGB": encoded(rgb)}
    for mode, data in cases.items():
        crop, original = images.preprocess(data, 16)
        assert original == mode and crop.shape == (16, 16, 3) and crop.dtype == np.uint8
    # Greyscale becomes three equal channels; RGBA drops alpha (as ImageFolder's loader does).
    grey, _ = images.load_image(cases["L"])
    assert np.array_equal(np.asarray(grey)[..., 0], np.asarray(grey)[..., 2])
    np.testing.assert_array_equal(np.asarray(images.load_image(cases["RGBA"])[0]), rgb)


def test_corrupt_and_truncated_files_raise_bad_image():
    data = encoded(natural_image(np.random.default_rng(1), 40, 40), fmt="JPEG")
    for bad in (b"", b"GIF89a nonsense", data[: len(data) // 2]):
        with pytest.raises(images.BadImage):
            images.preprocess(bad, 16)


def test_folder_source_numbers_classes_in_sorted_folder_order(image_tree, tmp_path):
    source = images.FolderSource(str(image_tree))
    assert source.class_names == ["n01", "n02", "n03"] and source.num_classes == 3
    assert len(source) == 3 * 8 + len(ODD_FILES)
    records = list(source.records(0, len(source)))
    assert [key for key, _, _ in records] == [f for f, _ in source.files]
    assert all(label == int(key[2]) - 1 for key, _, label in records)
    assert records[3][1] == (image_tree / records[3][0]).read_bytes()
    assert [k for k, _, _ in source.records(5, 7)] == [k for k, _, _ in records[5:7]]
    assert source.describe()["class_names"] == ["n01", "n02", "n03"]


def test_flat_folder_is_one_class_and_unreadable_files_are_yielded_as_errors(tmp_path):
    Image.fromarray(natural_image(np.random.default_rng(2), 20, 20)).save(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "b.jpg")  # a dangling link: listed, but cannot be read
    (tmp_path / "notes.txt").write_text("not an image")
    source = images.FolderSource(str(tmp_path))
    assert source.num_classes == 1 and len(source) == 2
    (_, data, label), (_, error, _) = source.records(0, 2)
    assert isinstance(data, bytes) and label == 0 and isinstance(error, OSError)


def test_folders_without_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.FolderSource(str(tmp_path / "missing"))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        images.FolderSource(str(tmp_path))


def test_tfds_source_reads_encoded_images_in_order(tmp_path):
    """A tiny prepared tfds dataset stands in for imagenet2012 (same features: image, label, file_name)."""
    import tensorflow_datasets as tfds

    pictures = [natural_image(np.random.default_rng(i), 20 + i, 30) for i in range(6)]

    class DitJaxTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, picture in enumerate(pictures):
                yield i, {"image": picture, "label": i % 3, "file_name": f"img{i}.png"}

    source = images.TfdsSource("dit_jax_tiny_images", data_dir=str(tmp_path))
    assert len(source) == 6 and source.num_classes == 3 and source.class_names == ["a", "b", "c"]
    everything = list(source.records(0, 6))  # tfds stores examples in its own (hashed) order
    assert sorted(key for key, _, _ in everything) == [f"img{i}.png" for i in range(6)]
    for key, data, label in everything:
        i = int(key[3])
        assert label == i % 3
        np.testing.assert_array_equal(np.asarray(images.load_image(data)[0]), pictures[i])
    assert [key for key, _, _ in source.records(2, 5)] == [key for key, _, _ in everything[2:5]]
    assert source.describe()["kind"] == "tfds"


def test_tfds_imagenet2012_goes_through_the_real_builder_to_its_manual_download_message(tmp_path):
    """tfds's own imagenet2012 builder (not a test builder), offline: it must ask for the manual download."""
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist or is empty.*ILSVRC2012_img_train\.tar"
                                                r".*--tfds_manual_dir"):
        images.TfdsSource("imagenet2012", data_dir=str(tmp_path / "data"), manual_dir=str(manual))
    assert not list(manual.iterdir())  # nothing was written into the user's manual folder


def test_16_bit_and_float_images_are_rescaled_to_8_bits():
    grey = natural_image(np.random.default_rng(3), 24, 30)[..., 0]
    expected = np.repeat(grey[..., None], 3, axis=-1)
    sixteen = encoded(grey.astype(np.uint16) * 257)  # PNG, mode I;16: PIL's conversion would give white
    floats = encoded((grey / 255).astype(np.float32), fmt="TIFF")  # mode F in [0, 1]: PIL's gives black
    floats_255 = encoded(grey.astype(np.float32), fmt="TIFF")  # mode F in [0, 255]
    int32 = encoded(grey.astype(np.int32) * 257, fmt="TIFF")  # mode I holding 16-bit values
    for data, mode in ((sixteen, "I;16"), (floats, "F"), (floats_255, "F"), (int32, "I")):
        image, original = images.load_image(data)
        assert original == mode and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=mode)


@pytest.mark.parametrize("values, found", [(np.full((8, 8), 1000.0), "1000, 1000"),
                                           (np.array([[np.nan, 0.5]]), "nan"),
                                           (np.array([[-1.0, 0.5]]), "-1, ")])
def test_float_images_without_an_8_bit_range_are_skipped_with_the_range(values, found):
    with pytest.raises(images.BadImage, match=rf"F image with values in \[.*{found}.*convert it to an 8-bit"):
        images.load_image(encoded(values.astype(np.float32), fmt="TIFF"))


def test_exif_orientation_is_not_applied_and_alpha_is_dropped_as_in_the_official_code():
    rgb = natural_image(np.random.default_rng(4), 20, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", exif=exif)
    image, _ = images.load_image(buffer.getvalue())
    assert image.getexif()[0x0112] == 6 and image.size == (32, 20)  # stored orientation, not rotated
    np.testing.assert_array_equal(np.asarray(image), rgb)
    transparent = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])  # fully transparent: colours kept
    np.testing.assert_array_equal(np.asarray(images.load_image(encoded(transparent))[0]), rgb)


def test_files_that_are_not_read_are_listed_with_reasons_and_empty_classes_named(tmp_path, caplog):
    picture = natural_image(np.random.default_rng(5), 20, 20)
    for path in ("a/x.png", "a/sub/y.JPEG", "a/anim.gif", "a/.hidden.png", "a/.cache/z.png", "c/w.png",
                 "top.png", ".git/objects.png"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(tmp_path / path, format="PNG")
    (tmp_path / "b").mkdir()  # an empty class folder
    (tmp_path / "notes.txt").write_text("not an image")
    source = images.FolderSource(str(tmp_path))
    assert source.class_names == ["a", "b", "c"] and source.empty_classes == ["b"]
    assert source.files == [("a/x.png", 0), ("a/sub/y.JPEG", 0), ("c/w.png", 2)]  # os.walk order, as ImageFolder
    assert "class folder" in caplog.text and "b (label 1) holds no images" in caplog.text
    reasons = {i["key"]: i["reason"] for i in source.ignored}
    assert sorted(reasons) == [".git/", "a/.cache/", "a/.hidden.png", "a/anim.gif", "notes.txt", "top.png"]
    assert reasons["a/anim.gif"].startswith(".gif: not an image extension")
    assert reasons["a/.cache/"] == reasons[".git/"] == "hidden folder: not read"
    assert reasons["top.png"] == reasons["notes.txt"] == "not in a class folder (the classes are the sub-folders)"
    assert source.describe()["empty_classes"] == ["b"]
