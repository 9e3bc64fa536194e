"""Image sources for latent extraction, and the ADM centre crop the official DiT applies.

A source is a sized, ordered collection of ``(key, encoded bytes or error, label)`` records:
an ImageFolder tree (``<root>/<class>/*.JPEG``, class index = sorted folder order, as
torchvision's ImageFolder and the official code number ImageNet's classes), any flat folder
of images (one class), or a TensorFlow Datasets split such as ``imagenet2012``. Decoding is
separate (``load_image``) so every source gets the same handling of bad files: corrupt or
truncated files raise ``BadImage`` (the caller skips and reports them); CMYK, greyscale,
palette and alpha images are converted to RGB the way ImageFolder's loader does (alpha is
dropped, not composited; EXIF orientation is not applied, as in the official code), and
16-bit and float greyscale images are first rescaled to 8 bits by their value range.

A folder source lists every file it does not read (other extensions such as GIF, files
outside the class folders, hidden files and folders) with the reason, and names empty
class folders (they still take their place in the class numbering, as in ImageFolder).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import itertools
import os
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from dit_jax import storage

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Record = tuple[str, "bytes | OSError", int]
# A cropped record: key, ADM crop (or the reason it is skipped), label, original mode ("" if skipped).
Crop = tuple[str, "np.ndarray | str", int, str]


class BadImage(ValueError):
    """An image that cannot be decoded (corrupt, truncated, unreadable): skip it and report why."""


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's preprocessing (used by the official DiT): uint8 ``[size, size, 3]`` from an RGB image.

    Halve with a box filter while the short side is at least twice ``size`` (cheap and
    alias-free), bicubic-resize the short side to ``size``, then take the centre square.
    """
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit (``I;16*``), 32-bit integer (``I``) or float (``F``) greyscale image as 8-bit ``L``.

    PIL's own conversion clips (16-bit images come out white, [0, 1] floats black), so the values
    are rescaled by their range: ``I;16`` by 255/65535; ``I`` as 8 bits if within [0, 255], else as
    16 bits if within [0, 65535]; ``F`` as [0, 1] if within it, else as [0, 255] if within that.
    Anything else (negative, larger, NaN) raises ``BadImage`` with the range found.
    """
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and 0 <= low and 255 < high <= 65535):
        values = values * (255 / 65535)
    elif image.mode == "F" and 0 <= low and high <= 1:
        values = values * 255
    elif not (0 <= low and high <= 255):  # also NaN: every comparison with it fails
        raise BadImage(f"{image.mode} image with values in [{low:g}, {high:g}]: no 8-bit range to rescale it "
                       "from (expected [0, 1] or [0, 255] for float, [0, 255] or [0, 65535] for integer images); "
                       "convert it to an 8-bit image")
    return Image.fromarray(np.round(values).astype(np.uint8), "L")


def load_image(data: bytes) -> tuple[Image.Image, str]:
    """Decode to an RGB PIL image; also the original mode ("RGB" when nothing was converted).

    Raises ``BadImage`` for anything PIL cannot fully decode, truncated files included, and for
    high-bit images whose values cannot be rescaled to 8 bits (``to_8_bits``).
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: truncation and corruption surface here, not later
        mode = image.mode
        if mode.startswith("I") or mode == "F":
            image = to_8_bits(image)
        return (image if mode == "RGB" else image.convert("RGB")), mode
    except BadImage:
        raise
    except UnidentifiedImageError as err:  # its message names a BytesIO address: say it plainly
        raise BadImage(f"{type(err).__name__}: not an image format PIL can read") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from err


def preprocess(data: bytes, size: int) -> tuple[np.ndarray, str]:
    """Encoded image bytes -> (uint8 ``[size, size, 3]`` ADM crop, original mode)."""
    image, mode = load_image(data)
    return adm_center_crop(image, size), mode


def crop_record(record: Record, size: int) -> Crop:
    """A source record -> (key, ADM crop or the reason it is skipped, label, original mode ("" if skipped))."""
    key, data, label = record
    if isinstance(data, OSError):
        return key, f"unreadable: {data}", label, ""
    try:
        pixels, mode = preprocess(data, size)
    except BadImage as err:
        return key, str(err), label, ""
    return key, pixels, label, mode


def crop_batches(records: Iterator[Record], *, size: int, batch_size: int,
                 pool: concurrent.futures.Executor) -> Iterator[list[Crop]]:
    """``records`` ADM-cropped (``crop_record``) on ``pool``'s threads, a list per ``batch_size`` of them, in
    order; the next batch is decoded while the caller works on this one."""
    crop = functools.partial(crop_record, size=size)
    pending = [pool.submit(crop, r) for r in itertools.islice(records, batch_size)]
    while pending:
        done = [f.result() for f in pending]
        pending = [pool.submit(crop, r) for r in itertools.islice(records, batch_size)]
        yield done


class ImageSource(Protocol):
    """What latent extraction reads: ordered records and the facts that go into the metadata."""

    num_classes: int
    ignored: list[dict[str, str]]  # files never read, each {"key", "reason"}

    def __len__(self) -> int: ...

    def records(self, start: int, stop: int) -> Iterator[Record]:
        """Records ``start..stop-1``: key, encoded bytes (or the OSError reading them), label."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of the source (kind, location, classes) for the metadata."""


def _skip_reason(name: str, is_dir: bool) -> str | None:
    """Why a folder entry is not read (None: it is read)."""
    if name.startswith("."):
        return "hidden folder: not read" if is_dir else "hidden file: not read"
    if not is_dir and not name.lower().endswith(EXTENSIONS):
        extension = os.path.splitext(name)[1] or "no extension"
        return f"{extension}: not an image extension read here ({' '.join(EXTENSIONS)}, as ImageFolder)"
    return None


class FolderSource:
    """Images under a folder: one class per sub-folder (ImageFolder), or a single class if there are none."""

    def __init__(self, root: str):
        if storage.is_bucket(root):
            raise ValueError(f"image folder {root!r} is in a bucket, and folders of images are read from a local disk "
                             "only: copy it first (`gcloud storage rsync -r`), or use a TFDS dataset (--tfds_name; "
                             "tfds reads a --tfds_data_dir=gs://... itself)")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        self.ignored: list[dict[str, str]] = []
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        subdirs = [e.name for e in entries if e.is_dir() and _skip_reason(e.name, True) is None]
        self.class_names = subdirs or [os.path.basename(os.path.normpath(root))]
        self.files: list[tuple[str, int]] = []
        self.empty_classes: list[str] = []
        for label, name in enumerate(subdirs):
            found = len(self.files)
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                self._keep(dirpath, dirnames, is_dir=True)
                self.files += [(os.path.relpath(os.path.join(dirpath, f), root), label)
                               for f in self._keep(dirpath, filenames, is_dir=False)]
            if len(self.files) == found:
                self.empty_classes.append(name)
                logging.warning("class folder %s (label %d) holds no images: the class is kept (numbered as "
                                "ImageFolder numbers it) but has no examples", os.path.join(root, name), label)
        if subdirs:  # ImageFolder: classes are the sub-folders, files beside them belong to none
            self.ignored += [{"key": e.name, "reason": "not in a class folder (the classes are the sub-folders)"}
                             for e in entries if not e.is_dir()]
            self.ignored += [{"key": e.name + "/", "reason": _skip_reason(e.name, True)}
                             for e in entries if e.is_dir() and e.name not in subdirs]
        else:
            self._keep(root, [e.name for e in entries if e.is_dir()], is_dir=True)
            self.files = [(f, 0) for f in self._keep(root, [e.name for e in entries if not e.is_dir()], is_dir=False)]
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(EXTENSIONS)}) under {root!r}: expected "
                                    "<root>/<class>/<image> (ImageFolder, e.g. ImageNet's train/<wnid>/*.JPEG) "
                                    f"or a folder of images ({len(self.ignored)} other files ignored)")
        self.num_classes = len(self.class_names)

    def _keep(self, folder: str, names: list[str], *, is_dir: bool) -> list[str]:
        """Sort ``names`` in place, drop (and list as ignored) what is not read; return what is."""
        keep = []
        for name in sorted(names):
            reason = _skip_reason(name, is_dir)
            if reason is None:
                keep.append(name)
            else:
                self.ignored.append({"key": os.path.relpath(os.path.join(folder, name), self.root)
                                     + ("/" if is_dir else ""), "reason": reason})
        names[:] = keep  # for os.walk: do not descend into hidden folders
        return keep

    def __len__(self) -> int:
        return len(self.files)

    def records(self, start: int, stop: int) -> Iterator[Record]:
        for relpath, label in self.files[start:stop]:
            try:
                with open(os.path.join(self.root, relpath), "rb") as f:
                    yield relpath, f.read(), label
            except OSError as err:
                yield relpath, err, label

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "root": os.path.abspath(self.root), "num_images": len(self),
                "class_names": self.class_names, "empty_classes": self.empty_classes}


class TfdsSource:
    """A TensorFlow Datasets split read in file order with the images left encoded (e.g. imagenet2012).

    ImageNet needs its manual download: ``manual_dir`` holds ILSVRC2012_img_train.tar (and
    _val.tar); the first use prepares the dataset in ``data_dir`` (tfds' own one-off step).
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
                 manual_dir: str | None = None):
        import tensorflow_datasets as tfds  # heavy; only this source needs it

        self._tfds = tfds
        self.name, self.split = name, split
        self.ignored: list[dict[str, str]] = []
        self.builder = tfds.builder(name, data_dir=data_dir)
        if manual_dir is not None or not self.builder.is_prepared():
            try:
                self.builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
            except AssertionError as err:  # how tfds says the manual download is missing
                if "Manual directory" not in str(err):
                    raise
                raise FileNotFoundError(f"tfds {name!r} needs its manual download before it can be prepared: {err}"
                                        "Put the files there and pass that folder as --tfds_manual_dir") from err
        label = self.builder.info.features["label"]
        self.class_names = list(label.names)
        self.num_classes = label.num_classes
        self._len = self.builder.info.splits[split].num_examples

    def __len__(self) -> int:
        return self._len

    def records(self, start: int, stop: int) -> Iterator[Record]:
        features = self.builder.info.features
        decoders = {"image": self._tfds.decode.SkipDecoding()}
        ds = self.builder.as_dataset(split=f"{self.split}[{start}:{stop}]", decoders=decoders, shuffle_files=False)
        for i, example in enumerate(ds.as_numpy_iterator()):
            key = example["file_name"].decode() if "file_name" in features else f"{self.split}[{start + i}]"
            yield key, example["image"], int(example["label"])

    def describe(self) -> dict[str, Any]:
        return {"kind": "tfds", "name": self.name, "split": self.split, "data_dir": self.builder.data_dir,
                "num_images": len(self), "class_names": self.class_names}


def define_source_flags() -> None:
    """The absl flags naming an image source (``--images`` or ``--tfds_*``) and its decoding threads
    (``--workers``), for every command that reads one."""
    from absl import flags

    flags.DEFINE_string("images", None, "image folder: ImageFolder tree <dir>/<class>/* (e.g. ImageNet train/) or "
                        "a flat folder of images (one class)")
    flags.DEFINE_string("tfds_name", None, "instead of --images: a TensorFlow Datasets name, e.g. imagenet2012")
    flags.DEFINE_string("tfds_split", "train", "the tfds split, e.g. train or validation")
    flags.DEFINE_string("tfds_data_dir", None, "tfds data_dir (where the prepared dataset lives or will be prepared)")
    flags.DEFINE_string("tfds_manual_dir", None, "tfds manual download dir (ImageNet: ILSVRC2012_img_train.tar, "
                        "_val.tar)")
    flags.DEFINE_integer("workers", None, "decode/crop threads (default: CPU count)")


def check_source_flags() -> None:
    """Exactly one of ``--images`` and ``--tfds_name`` (an ``app.UsageError`` otherwise)."""
    from absl import app, flags

    if (flags.FLAGS.images is None) == (flags.FLAGS.tfds_name is None):
        raise app.UsageError("give exactly one of --images and --tfds_name")


def source_from_flags() -> ImageSource:
    """The source ``define_source_flags``' flags name (checked with ``check_source_flags`` first)."""
    from absl import flags

    f = flags.FLAGS
    if f.images is not None:
        return FolderSource(f.images)
    return TfdsSource(f.tfds_name, split=f.tfds_split, data_dir=f.tfds_data_dir, manual_dir=f.tfds_manual_dir)
