"""Pretrained weights and every other file the project fetches: one registry, one cache, one loader.

``load_dit(ckpt)`` builds a ``DiT`` from any checkpoint a user has: an official name
(fetched), an official ``.pt`` (a plain state dict, or a training checkpoint whose ``ema`` it
takes), a diffusers DiT folder or hub id (safetensors, read without PyTorch), or a dit_jax
workdir (the EMA parameters of its newest intact Orbax checkpoint, and its saved config).

``REGISTRY`` names each fetchable file (URL, and the size or SHA-256 where known) or Hugging
Face hub folder; ``fetch(name)`` returns its local path under ``cache_dir()`` (the environment
variable ``DIT_JAX_CACHE``, default ``~/.cache/dit_jax``), downloading it first if needed.
Downloads are resumable and atomic: bytes go to ``<file>.partial`` (continued with an HTTP
``Range`` request after an interruption or a killed run) and the file gets its final name only
once its size, checksum and format are checked (``format_problem``: an HTML error page or a
body cut short never enters the cache). ``DIT_JAX_MIRROR`` (a base URL) fetches every file from
``<mirror>/<name>`` instead. With no network (or ``DIT_JAX_OFFLINE=1``) a missing file is an
immediate error naming the URL and the exact path to put the file at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from dit_jax import storage

if TYPE_CHECKING:
    from dit_jax.models import DiT

CACHE_ENV = "DIT_JAX_CACHE"
OFFLINE_ENV = "DIT_JAX_OFFLINE"
# A base URL that serves the registry's files under their names (a proxy, a local mirror, the tests' server).
MIRROR_ENV = "DIT_JAX_MIRROR"
DEFAULT_CACHE = "~/.cache/dit_jax"
# Seconds without a byte before a connection counts as failed (offline: fail at once, not hang).
TIMEOUT_S = 30.0
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One file at ``url``; ``size`` (bytes) and ``sha256`` are checked when known (None: not published)."""

    url: str
    what: str
    size: int | None = None
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class HubFolder:
    """Files of a Hugging Face hub repository: every name in ``files`` and the first of ``weights`` it has."""

    repo_id: str
    what: str
    files: tuple[str, ...]
    weights: tuple[str, ...]


_DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
_REF_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
# What a diffusers model folder holds (weights: safetensors if the repository has them).
VAE_FILES = dict(files=("config.json",),
                 weights=("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))
DIFFUSERS_DIT_FILES = dict(files=("transformer/config.json",),
                           weights=("transformer/diffusion_pytorch_model.safetensors",
                                    "transformer/diffusion_pytorch_model.bin"))

# Sizes and checksums are recorded only where a published source states them; none of these
# publishers lists them, so only the length the server announces is checked.
REGISTRY: dict[str, RemoteFile | HubFolder] = {
    "DiT-XL-2-256x256.pt": RemoteFile(_DIT_URL + "DiT-XL-2-256x256.pt",
                                      "the official DiT-XL/2 at 256x256 (EMA weights, a plain state dict)"),
    "DiT-XL-2-512x512.pt": RemoteFile(_DIT_URL + "DiT-XL-2-512x512.pt",
                                      "the official DiT-XL/2 at 512x512 (EMA weights, a plain state dict)"),
    "pt_inception-2015-12-05-6726825d.pth": RemoteFile(
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        "TensorFlow's 2015 InceptionV3 (the FID network) in PyTorch names, as pytorch-fid ships it"),
    "weights-inception-2015-12-05-6726825d.pth": RemoteFile(
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "TensorFlow's 2015 InceptionV3 (the FID network) in PyTorch names, as torch-fidelity ships it"),
    "VIRTUAL_imagenet256_labeled.npz": RemoteFile(
        _REF_URL + "256/VIRTUAL_imagenet256_labeled.npz",
        "ADM's ImageNet 256x256 reference batch (statistics of the whole set, 10,000 images, labels)"),
    "VIRTUAL_imagenet512.npz": RemoteFile(_REF_URL + "512/VIRTUAL_imagenet512.npz",
                                          "ADM's ImageNet 512x512 reference batch (statistics, 10,000 images)"),
    "stabilityai/sd-vae-ft-ema": HubFolder("stabilityai/sd-vae-ft-ema", "the SD VAE, EMA-fine-tuned decoder (DiT's "
                                           "default)", **VAE_FILES),
    "stabilityai/sd-vae-ft-mse": HubFolder("stabilityai/sd-vae-ft-mse", "the SD VAE, MSE-fine-tuned decoder",
                                           **VAE_FILES),
    "facebook/DiT-XL-2-256": HubFolder("facebook/DiT-XL-2-256", "DiT-XL/2 at 256x256 in diffusers' format",
                                       **DIFFUSERS_DIT_FILES),
    "facebook/DiT-XL-2-512": HubFolder("facebook/DiT-XL-2-512", "DiT-XL/2 at 512x512 in diffusers' format",
                                       **DIFFUSERS_DIT_FILES),
}


class DownloadError(OSError):
    """A registry file could not be fetched, or what arrived is not the file."""


class MissingFileError(DownloadError, FileNotFoundError):
    """A file is not in the cache and cannot be downloaded here (offline, or the server refused)."""


def cache_dir() -> Path:
    """Where fetched files live: ``$DIT_JAX_CACHE``, default ``~/.cache/dit_jax``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def url_of(name: str) -> str:
    """Where registry file ``name`` is downloaded from: ``$DIT_JAX_MIRROR/<name>`` when that is set, else its URL."""
    entry, mirror = _entry(name), os.environ.get(MIRROR_ENV, "")
    if isinstance(entry, HubFolder):
        raise ValueError(f"{name} is a Hugging Face hub folder, not a file (set HF_ENDPOINT for a hub mirror)")
    return f"{mirror.rstrip('/')}/{name}" if mirror else entry.url


def offline_by_default() -> bool:
    """True when ``DIT_JAX_OFFLINE`` is set to anything but ``0`` or empty."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def local_path(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The path ``name`` has (or will have) in the cache: a file, or a hub repository's folder."""
    entry = _entry(name)
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    return root / "hub" / entry.repo_id if isinstance(entry, HubFolder) else root / name


def fetch(name: str, *, cache: str | os.PathLike | None = None, offline: bool | None = None,
          progress: bool = True, retries: int = 3) -> Path:
    """The local path of registry entry ``name``, downloaded into the cache first if it is not there.

    A file download (from ``url_of(name)``) resumes a ``.partial`` left by an interrupted or
    killed earlier try, retries a dropped connection ``retries`` times (each resuming where it
    stopped) and checks the size, checksum and format before the file gets its name; a mismatch
    deletes what arrived and raises ``DownloadError``. A cached file is checked the same way
    (without the checksum) before it is returned. ``offline`` (default: ``DIT_JAX_OFFLINE``) never touches the network; a
    missing file is then a ``MissingFileError`` naming the URL and where to put the file.
    """
    entry, dest = _entry(name), local_path(name, cache)
    offline = offline_by_default() if offline is None else offline
    if isinstance(entry, HubFolder):
        return fetch_hub(entry, cache=cache, offline=offline)
    url = url_of(name)
    if dest.is_file():
        _check_cached(dest, entry.size, name)
        return dest
    if offline:
        raise _missing(name, url, dest, f"offline: {OFFLINE_ENV} is set or offline=True")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if not dest.is_file():  # another process may have finished it while this one waited
            download(url, dest, size=entry.size, sha256=entry.sha256, progress=progress, retries=retries, name=name)
    return dest


def locate(value: str | os.PathLike, names: tuple[str, ...]) -> str:
    """The file a user named in a flag or config field, resolved once: one of the registry files ``names``
    (``VIRTUAL_imagenet256_labeled.npz``) unless a local file has that name, fetched into the cache;
    otherwise a path (``~``, relative, trailing slash, ``gs://``) as ``storage.absolute`` resolves it."""
    value = os.fspath(value)
    if value in names and not os.path.exists(value):
        return os.fspath(fetch(value))
    return storage.absolute(value)


def download(url: str, dest: str | os.PathLike, *, size: int | None = None, sha256: str | None = None,
             progress: bool = True, retries: int = 3, name: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.partial`` (resumed with HTTP Range), checked, then renamed.

    The caller holds whatever lock keeps other writers away (``fetch`` does). Raises
    ``MissingFileError`` when the server cannot be reached or refuses the file, ``DownloadError``
    when the transfer keeps breaking (the ``.partial`` stays: rerunning continues it), when the
    server answers with an HTML page, or when the finished file has the wrong size or checksum or
    is not of its format (``format_problem``; it is deleted).
    """
    dest = Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    label = name or dest.name
    failures = []
    for attempt in range(retries + 1):
        try:
            _transfer(url, partial, label=label, progress=progress)
            break
        except DownloadError:  # what arrived is not the file: retrying would fetch the same
            raise
        except urllib.error.HTTPError as err:
            if err.code == 416 and partial.exists():  # nothing left to send: the partial file is whole
                break
            raise _missing(label, url, dest, f"HTTP {err.code} {err.reason}", kept=_size(partial)) from err
        except urllib.error.URLError as err:  # no route, DNS failure, refused: the network is not there
            raise _missing(label, url, dest, str(err.reason), kept=_size(partial)) from err
        except (OSError, http.client.HTTPException) as err:  # a connection that broke off mid-transfer
            failures.append(f"{type(err).__name__}: {err}")
            if attempt < retries:
                time.sleep(min(2.0 ** attempt, 10.0) * 0.1)
    else:
        raise DownloadError(f"downloading {label} from {url} broke off {len(failures)} times ({failures[-1]}); "
                            f"{_size(partial)} bytes are kept in {partial}: rerun to continue from there")
    _verify(partial, size=size, sha256=sha256, label=label, url=url)
    os.replace(partial, dest)
    return dest


def _transfer(url: str, partial: Path, *, label: str, progress: bool) -> None:
    """Append the rest of ``url`` to ``partial`` (a Range request from its current length)."""
    offset = _size(partial)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        kind = response.headers.get("Content-Type", "")
        if kind.split(";")[0].strip().lower() == "text/html":  # a proxy's login or a server's error page
            raise DownloadError(f"{url} answered with an HTML page (Content-Type {kind}), not {label}; nothing was "
                                f"kept. Open the URL in a browser to see why, or set {MIRROR_ENV} to a server that "
                                "has the file")
        status = getattr(response, "status", None)
        resumed = offset and status == 206
        if offset and not resumed:  # the server ignored the Range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(partial, "ab" if resumed else "wb") as out, _progress_bar(label, total, offset, progress) as bar:
            received = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if length is not None and received != int(length):
            raise ConnectionError(f"the server announced {length} bytes and sent {received}")


def _verify(path: Path, *, size: int | None, sha256: str | None, label: str, url: str) -> None:
    """Delete ``path`` and raise if its size or SHA-256 is not the expected one, or it is not of its format."""
    problems = []
    if size is not None and _size(path) != size:
        problems.append(f"{_size(path)} bytes instead of {size}")
    problem = None if problems else format_problem(path, label)
    if problem:
        problems.append(problem)
    if sha256 is not None and not problems:
        actual = storage.sha256_file(path)
        if actual != sha256.lower():
            problems.append(f"SHA-256 {actual} instead of {sha256.lower()}")
    if problems:
        path.unlink()
        raise DownloadError(f"the download of {label} from {url} is not the expected file ({'; '.join(problems)}); "
                            "it was deleted. Rerun to download it again; if this repeats, the file at the URL "
                            "has changed: fetch it yourself and check it")


def _check_cached(path: Path, size: int | None, name: str) -> None:
    """Raise if a cached file has the wrong size or is not of its format (put there by hand, or by an older version)."""
    problem = (f"{_size(path)} bytes, but {name} has {size}" if size is not None and _size(path) != size
               else format_problem(path, name))
    if problem:
        raise DownloadError(f"{path} in the cache is not {name}: {problem}. Delete it and fetch again")


def format_problem(path: str | os.PathLike, name: str) -> str | None:
    """Why ``path`` is not a whole file of the format ``name``'s extension says (None: it looks whole).

    Checks what a wrong or cut-short download breaks: an HTML page where a binary file belongs,
    a zip (``.npz``, a PyTorch ``.pt``/``.pth``/``.bin``) without its closing central directory,
    a ``.safetensors`` whose header promises more bytes than the file has. A PyTorch file
    in the legacy (pre-1.6) format is a pickle, checked by its first byte only.
    """
    import json
    import struct
    import zipfile

    suffix = os.path.splitext(name)[1].lower()
    with open(path, "rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] == b"<":
        return f"it is an HTML or XML page, not the file (it starts with {head.lstrip()[:40]!r})"
    if suffix in (".npz", ".pt", ".pth", ".bin"):
        if suffix != ".npz" and head[:1] == b"\x80":  # a legacy torch.save pickle
            return None
        if head[:4] != b"PK\x03\x04":
            return f"it is not a zip archive (an {suffix} file is one; it starts with {head[:16]!r})"
        if not zipfile.is_zipfile(path):
            return f"the zip archive is cut short ({_size(Path(path))} bytes: its central directory is missing)"
    if suffix == ".safetensors":
        size = _size(Path(path))
        length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else size
        if 8 + length > size:
            return f"it is cut short or not a safetensors file ({size} bytes; its header alone claims {8 + length})"
        try:
            with open(path, "rb") as f:
                f.seek(8)
                header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return f"its safetensors header cannot be read ({type(err).__name__})"
        if size != 8 + length + end:
            return f"it has {size} bytes where its safetensors header describes {8 + length + end}"
    return None


def _missing(name: str, url: str, dest: Path, reason: str, kept: int = 0) -> MissingFileError:
    partial = (f" ({kept} bytes already arrived in {dest}.partial and are kept: a rerun with network continues "
               "from there)" if kept else "")
    return MissingFileError(
        f"{name} is not in the cache and cannot be downloaded here ({reason}){partial}. Download {url} on a "
        f"machine with network and put it at {dest} (e.g. `curl -L -o {dest} {url}`), point {CACHE_ENV} at "
        f"a folder that holds it, or set {MIRROR_ENV} to a server that has it")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id ``owner/name`` rather than a local path (absolute, ``./``, ``../``,
    ``~``, existing, or inside an existing folder)."""
    first = name.split("/", 1)[0]
    return not (name.count("/") != 1 or name.startswith(("/", ".", "~")) or os.path.isdir(first)
                or os.path.exists(name))


def fetch_hub(entry: HubFolder, *, cache: str | os.PathLike | None = None, offline: bool | None = None) -> Path:
    """A hub repository's files in ``<cache>/hub/<repo_id>`` (a plain folder), downloaded with
    huggingface_hub (which resumes and renames atomically) if missing; also for repositories
    outside the registry."""
    dest = (Path(cache).expanduser() if cache is not None else cache_dir()) / "hub" / entry.repo_id
    offline = offline_by_default() if offline is None else offline
    if _hub_complete(entry, dest):
        return dest
    wanted = " ".join(entry.files + entry.weights[:1])
    how = (f"On a machine with network run `hf download {entry.repo_id} {wanted} --local-dir {dest}` "
           f"and copy that folder here, to {dest}")
    if offline:
        raise MissingFileError(f"{entry.repo_id} is not in the cache and cannot be downloaded here (offline). {how}")
    try:
        from huggingface_hub import snapshot_download

        for weights in entry.weights:  # one weight file: the first format the repository has
            snapshot_download(entry.repo_id, allow_patterns=[*entry.files, weights], local_dir=dest)
            if _hub_complete(entry, dest):
                return dest
    except Exception as err:  # no network, unknown repo, no huggingface_hub: all mean "fetch it yourself"
        raise MissingFileError(f"could not get {entry.repo_id} from the Hugging Face Hub "
                               f"({type(err).__name__}: {str(err)[:300]}). {how}") from err
    raise MissingFileError(f"{entry.repo_id} on the Hugging Face Hub has none of {', '.join(entry.weights)}. {how}")


def _hub_complete(entry: HubFolder, folder: Path) -> bool:
    return all((folder / f).is_file() for f in entry.files) and any((folder / w).is_file() for w in entry.weights)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A weight file's tensors as numpy arrays: ``.safetensors`` without PyTorch, anything else
    (``.bin``, ``.pt``, ``.pth``: a pickled PyTorch state dict) through ``torch.load``."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path)
    return _torch_state_dict(_torch_load(path), path)


def _torch_load(path: str) -> Any:
    """``torch.load`` on the CPU, tensors and plain containers only (no code runs from the file)."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"reading {path} (a PyTorch pickle) needs PyTorch: pip install torch (the CPU wheel "
                          "is enough), or convert the file to .safetensors elsewhere") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a PyTorch checkpoint that loads safely ({type(err).__name__}: "
                         f"{str(err)[:300]})") from err


def _torch_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    """A ``{name: tensor}`` mapping as float/int numpy arrays (bfloat16 and float16 widened to float32)."""
    import torch

    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds {_describe(obj)}, not a state dict of tensors")
    return {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).numpy() for k, v in obj.items()}


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = list(obj)[:8]
        return f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _entry(name: str) -> RemoteFile | HubFolder:
    if name not in REGISTRY:
        raise KeyError(f"{name!r} is not a registered download; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One writer per cache file across processes (hosts sharing a cache folder, parallel jobs)."""
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_bar(label: str, total: int | None, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
              disable=not enabled, leave=False) as bar:
        yield bar


def materialise(abstract: Any) -> Any:
    """Zero arrays in place of an ``nnx.eval_shape`` module's shapes: no random init for weights about to be loaded."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


# ---------------------------------------------------------------- loading any DiT

class LoadedDiT(NamedTuple):
    """A DiT with its weights loaded, and what it is: ``info`` holds ``model`` (a paper name or
    ``None``), ``image_size``, ``input_size``, ``num_classes``, ``learn_sigma``, ``source``
    (``official`` | ``official-train`` | ``diffusers`` | ``workdir``), ``path`` and ``architecture``
    (the ``DiT`` keyword arguments), plus ``step`` for a workdir."""

    model: DiT
    info: dict[str, Any]


# SD-VAE latents: 8x downsampling, 4 channels. Checkpoints of other channel counts are pixel-space models.
LATENT_CHANNELS, LATENT_DOWNSAMPLE = 4, 8
ARCH_FIELDS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
               "num_classes", "learn_sigma", "class_dropout_prob", "block_type")


def load_dit(ckpt: str, *, model: str | None = None, image_size: int | None = None,
             num_classes: int | None = None, learn_sigma: bool | None = None, num_heads: int | None = None,
             dtype: str = "float32",
             attention: str = "auto", cache: str | os.PathLike | None = None,
             offline: bool | None = None) -> LoadedDiT:
    """The DiT in ``ckpt`` with its weights, its architecture read from the checkpoint.

    ``ckpt``: a registry name (``DiT-XL-2-256x256.pt``, ``facebook/DiT-XL-2-256``: fetched into
    the cache), a local official ``.pt``/``.pth``/``.safetensors`` state dict or official
    training checkpoint, a diffusers DiT folder (``transformer/`` or the transformer folder
    itself) or hub id, or a dit_jax workdir (or its ``checkpoints/`` folder). ``model``,
    ``image_size``, ``num_classes`` and ``learn_sigma`` are checks (and name the heads of a
    plain state dict of a non-paper width): a checkpoint that differs raises a ValueError
    listing every mismatch. ``dtype``/``attention`` are the compute options (``models.compute_options``).
    """
    from dit_jax import convert
    from dit_jax.models import compute_options

    kind, path = _resolve_dit(ckpt, cache=cache, offline=offline)
    options = compute_options(dtype, "none", attention)
    if kind == "workdir":
        return _load_workdir(path, options, checks=dict(model=model, image_size=image_size,
                                                        num_classes=num_classes, learn_sigma=learn_sigma))
    extra: dict[str, Any] = {}
    if kind == "diffusers":
        config, state_dict = _read_diffusers(path)
        arch = _diffusers_architecture(config, path)
        state_dict = diffusers_to_official(state_dict, depth=arch["depth"], source=str(path))
        kind_label, name_hint = "diffusers", None
    else:
        state_dict, train_args = _read_official(path)
        kind_label = "official-train" if train_args is not None else "official"
        name_hint = getattr(train_args, "model", None) if train_args is not None else None
        arch = official_architecture(state_dict, source=str(path), model=model or name_hint,
                                     num_classes=num_classes, num_heads=num_heads)
        if train_args is not None:
            extra["train_args"] = {k: v for k, v in vars(train_args).items() if isinstance(v, (int, float, str, bool))}
    info = _describe_arch(arch, kind_label, path)
    _check_against(info, arch, dict(model=model, image_size=image_size, num_classes=num_classes,
                                    learn_sigma=learn_sigma), source=str(path))
    net = _build(arch, options)
    if "pos_embed" not in state_dict:  # diffusers recomputes the fixed table; so does the official model
        state_dict = {**state_dict, "pos_embed": np.asarray(net.pos_embed[...])}
    convert.load_official_state_dict(net, state_dict, source=str(path))
    return LoadedDiT(net, {**info, **extra})


def _resolve_dit(ckpt: str, *, cache, offline) -> tuple[str, Path]:
    """(kind, local path): kind is ``official`` (a weight file), ``diffusers`` (a folder) or ``workdir``."""
    if ckpt in REGISTRY:
        entry = REGISTRY[ckpt]
        if isinstance(entry, HubFolder) and entry.files != DIFFUSERS_DIT_FILES["files"]:
            raise ValueError(f"{ckpt} is {entry.what}, not a DiT")
        path = fetch(ckpt, cache=cache, offline=offline)
        return ("diffusers", path) if isinstance(entry, HubFolder) else ("official", path)
    # A run's workdir may be in a bucket (Orbax reads it there); weight files and diffusers folders are read locally.
    bucket = storage.is_bucket(ckpt)
    path = storage.path(ckpt) if bucket else Path(storage.absolute(ckpt))  # Orbax reads absolute paths only
    if path.is_file() and not bucket:
        return "official", path
    if path.is_dir():
        if (path / "checkpoints").is_dir() or any(p.name.isdigit() for p in path.iterdir()):
            return "workdir", path / "checkpoints" if (path / "checkpoints").is_dir() else path
        for folder in (path / "transformer", path):
            if (folder / "config.json").is_file() and not bucket:
                return "diffusers", folder
        raise FileNotFoundError(f"{path} is a folder but neither a dit_jax workdir (checkpoints/<step>/) nor a "
                                "diffusers DiT folder (transformer/config.json + diffusion_pytorch_model.safetensors)"
                                + (" on a local disk (copy one from the bucket with `gcloud storage cp -r`)" if bucket
                                   else ""))
    if bucket:
        raise FileNotFoundError(f"{ckpt} is not a folder in the bucket: of a bucket only a dit_jax workdir is read "
                                "directly; copy weight files to a local disk (`gcloud storage cp`)")
    if is_hub_id(ckpt):
        entry = HubFolder(ckpt, "a diffusers DiT", **DIFFUSERS_DIT_FILES)
        return "diffusers", fetch_hub(entry, cache=cache, offline=offline) / "transformer"
    known = ", ".join(n for n, e in REGISTRY.items() if "DiT" in n)
    raise FileNotFoundError(f"DiT checkpoint {ckpt!r} not found: give a local file or folder, or one of {known}")


def _read_official(path: Path) -> tuple[dict[str, np.ndarray], Any]:
    """An official-format state dict from ``path``, and the training ``args`` if it is a ``train.py`` checkpoint."""
    if path.suffix == ".safetensors":
        return read_weights(path), None
    import argparse

    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py saves its argparse args
        obj = _torch_load(str(path))
    args = None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        args = obj.get("args")  # the official find_model takes the EMA weights of a training checkpoint
        obj = obj["ema"]
    return _torch_state_dict(obj, str(path)), args


_WHAT_IS_IT = (("encoder.conv_in.weight", "a VAE (AutoencoderKL) state dict"),
               ("Conv2d_1a_3x3.conv.weight", "an InceptionV3 state dict (the FID network)"),
               ("transformer_blocks.0.attn1.to_q.weight", "a diffusers DiT state dict: pass its folder instead"),
               ("model.diffusion_model.input_blocks.0.0.weight", "a Stable Diffusion / LDM U-Net checkpoint"))


def _not_a_dit(state_dict: dict[str, Any], source: str) -> ValueError:
    what = next((w for k, w in _WHAT_IS_IT if any(name.endswith(k) for name in state_dict)), None)
    keys = list(state_dict)[:6]
    return ValueError(f"{source} is not a DiT checkpoint: it holds {what or 'a state dict'} "
                      f"({len(state_dict)} tensors, e.g. {keys}); a DiT has x_embedder.proj.weight, blocks.N.* "
                      "and final_layer.*")


def official_architecture(state_dict: dict[str, np.ndarray], *, source: str, model: str | None = None,
                          num_classes: int | None = None, num_heads: int | None = None) -> dict[str, Any]:
    """The ``DiT`` keyword arguments an official-format state dict was made with, from its shapes.

    Heads are not visible in shapes: they come from ``model`` (a paper name) or ``num_heads``,
    else from the paper model of that width and depth; any other width needs one of them.
    """
    from dit_jax.models import MODELS, SIZES

    needed = ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight")
    if any(k not in state_dict for k in needed):
        raise _not_a_dit(state_dict, source)
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    if "pos_embed" in state_dict:
        tokens = state_dict["pos_embed"].shape[1]
    else:
        raise ValueError(f"{source} has no pos_embed: the resolution cannot be read from it")
    grid = int(round(tokens ** 0.5))
    if "blocks.0.cross_attn.q.weight" in state_dict:
        block_type = "cross_attention"
    elif "blocks.0.adaLN_modulation.1.weight" in state_dict:
        block_type = "adaln_zero" if state_dict["blocks.0.adaLN_modulation.1.weight"].shape[0] == 6 * hidden else "adaln"
    else:
        block_type = "in_context"
    # Label dropout adds the null row; a table of exactly num_classes rows was trained without it.
    dropout = 0.0 if num_classes is not None and rows == num_classes else 0.1
    arch = dict(input_size=grid * patch, patch_size=int(patch), in_channels=int(in_channels), hidden_size=int(hidden),
                depth=depth, mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                num_classes=int(rows - (dropout > 0)), learn_sigma=out_channels == 2 * in_channels,
                class_dropout_prob=dropout, block_type=block_type)
    if model is not None and model in MODELS:
        arch["num_heads"] = MODELS[model]["num_heads"] if num_heads is None else num_heads
    elif num_heads is not None:
        arch["num_heads"] = num_heads
    else:
        paper = [size for size, a in SIZES.items() if (a["hidden_size"], a["depth"]) == (hidden, depth)]
        if not paper:
            raise ValueError(f"{source} is a DiT of width {hidden} and depth {depth}, not a paper model: its number "
                             "of attention heads is not in the file; give it with --num_heads N (sample, export; "
                             "num_heads= in load_dit)")
        arch["num_heads"] = SIZES[paper[0]]["num_heads"]
    return arch


def paper_name(arch: dict[str, Any]) -> str | None:
    """``DiT-XL/2`` etc. when the architecture is a paper model's (any resolution and class count)."""
    from dit_jax.models import MODELS

    keys = ("patch_size", "hidden_size", "depth", "num_heads")
    return next((n for n, a in MODELS.items() if all(a[k] == arch[k] for k in keys)
                 and arch["mlp_ratio"] == 4.0 and arch["block_type"] == "adaln_zero"), None)


def _describe_arch(arch: dict[str, Any], source: str, path: Path) -> dict[str, Any]:
    latent = arch["in_channels"] == LATENT_CHANNELS
    return {"model": paper_name(arch),
            "image_size": arch["input_size"] * (LATENT_DOWNSAMPLE if latent else 1),
            "input_size": arch["input_size"], "num_classes": arch["num_classes"], "learn_sigma": arch["learn_sigma"],
            "source": source, "path": str(path), "architecture": dict(arch)}


def _check_against(info: dict[str, Any], arch: dict[str, Any], asked: dict[str, Any], *, source: str) -> None:
    """Raise a ValueError listing every asked property the checkpoint does not have."""
    from dit_jax.models import MODELS

    wrong = []
    if asked["model"] is not None:
        if asked["model"] not in MODELS:
            raise ValueError(f"unknown model {asked['model']!r}; choose one of {', '.join(MODELS)}")
        want = MODELS[asked["model"]]
        differ = [f"{k} {arch[k]} (asked {want[k]})" for k in ("patch_size", "hidden_size", "depth", "num_heads")
                  if arch[k] != want[k]]
        if differ:
            wrong.append(f"model: the checkpoint is {info['model'] or 'a custom DiT'} ({', '.join(differ)}), "
                         f"asked {asked['model']}")
    for key in ("image_size", "num_classes", "learn_sigma"):
        if asked[key] is not None and asked[key] != info[key]:
            wrong.append(f"{key}: the checkpoint has {info[key]}, asked {asked[key]}")
    if wrong:
        raise ValueError(f"{source} is not the DiT asked for:\n  " + "\n  ".join(wrong)
                         + "\nLeave those settings out to use the checkpoint's, or pick the checkpoint made for them.")


def _build(arch: dict[str, Any], options: dict[str, Any]) -> DiT:
    """The DiT of ``arch`` with zero weights (to be loaded) and the fixed position table computed."""
    from flax import nnx

    from dit_jax.models import DiT, sincos_2d_pos_embed

    net = materialise(nnx.eval_shape(lambda: DiT(**arch, **options, rngs=nnx.Rngs(0))))
    table = sincos_2d_pos_embed(arch["hidden_size"], arch["input_size"] // arch["patch_size"])
    net.pos_embed[...] = np.asarray(table[None], np.float32)
    return net


# ---------------------------------------------------------------- diffusers' DiTTransformer2DModel

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# One official name -> the diffusers names of its copies ({i}: the block; embedders repeat in every block).
_DIFFUSERS_GLOBAL = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
                     "final_layer.linear": "proj_out_2"}
_DIFFUSERS_EMBEDDERS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
                        "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
                        "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
_DIFFUSERS_BLOCK = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
                    "mlp.fc2": "ff.net.2"}
_QKV = ("to_q", "to_k", "to_v")


def _read_diffusers(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    import json

    with open(folder / "config.json") as f:
        config = json.load(f)
    weights = [folder / Path(w).name for w in DIFFUSERS_DIT_FILES["weights"] if (folder / Path(w).name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder} has a config.json but no diffusion_pytorch_model.safetensors (or .bin)")
    return config, read_weights(weights[0])


def _diffusers_architecture(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``DiT`` keyword arguments from a diffusers ``config.json``; anything else than a DiT is an error."""
    cls = config.get("_class_name")
    if cls not in DIFFUSERS_CLASSES or config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"{folder} holds a diffusers {cls} (norm_type {config.get('norm_type')!r}), not a DiT "
                         "(DiTTransformer2DModel with norm_type 'ada_norm_zero')")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    return dict(input_size=config["sample_size"], patch_size=config["patch_size"], in_channels=in_channels,
                hidden_size=hidden, depth=config["num_layers"], num_heads=config["num_attention_heads"],
                mlp_ratio=4.0, num_classes=config["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels,
                class_dropout_prob=0.1, block_type="adaln_zero")


def diffusers_to_official(state_dict: dict[str, np.ndarray], *, depth: int, source: str) -> dict[str, np.ndarray]:
    """A diffusers ``DiTTransformer2DModel`` state dict in the official names and layouts.

    diffusers keeps a copy of the timestep and label embedders in every block (its forward uses
    block 0's for the final layer); they must all be equal, as in a converted official model,
    since the official architecture has one. q, k and v are concatenated into ``qkv``.
    """
    sd = dict(state_dict)
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in sd:
            raise ValueError(f"{source} is missing {name}: not a complete diffusers DiT")
        return sd.pop(name)

    for ours, theirs in _DIFFUSERS_GLOBAL.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    differing = []
    for ours, theirs in _DIFFUSERS_EMBEDDERS.items():
        for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
            copies = [take(f"transformer_blocks.{i}.{theirs}.{p}") for i in range(depth)]
            if any(not np.array_equal(c, copies[0]) for c in copies[1:]):
                differing.append(f"{theirs}.{p}")
            out[f"{ours}.{p}"] = copies[0]
    if differing:
        raise ValueError(f"{source}: the blocks hold different copies of {', '.join(differing)} (trained as "
                         "separate embedders in diffusers); the official DiT has one timestep and one label "
                         "embedder, so this model cannot be loaded without changing what it computes")
    for i in range(depth):
        for ours, theirs in _DIFFUSERS_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = take(f"transformer_blocks.{i}.{theirs}.{p}")
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(
                [take(f"transformer_blocks.{i}.attn1.{q}.{p}") for q in _QKV], axis=0)
    if sd:
        raise ValueError(f"{source} has tensors a DiT does not: {sorted(sd)[:10]}")
    return out


def official_to_diffusers(state_dict: dict[str, np.ndarray], *, depth: int) -> dict[str, np.ndarray]:
    """The inverse of ``diffusers_to_official`` (embedders copied into every block, qkv split)."""
    out: dict[str, np.ndarray] = {}
    for ours, theirs in _DIFFUSERS_GLOBAL.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state_dict[f"{ours}.{p}"]
    for i in range(depth):
        for ours, theirs in _DIFFUSERS_EMBEDDERS.items():
            for p in ("weight", "bias") if "embedding_table" not in ours else ("weight",):
                out[f"transformer_blocks.{i}.{theirs}.{p}"] = state_dict[f"{ours}.{p}"]
        for ours, theirs in _DIFFUSERS_BLOCK.items():
            for p in ("weight", "bias"):
                out[f"transformer_blocks.{i}.{theirs}.{p}"] = state_dict[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            for q, part in zip(_QKV, np.split(state_dict[f"blocks.{i}.attn.qkv.{p}"], 3, axis=0)):
                out[f"transformer_blocks.{i}.attn1.{q}.{p}"] = part
    return out


def diffusers_config(arch: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a ``DiTTransformer2DModel`` with ``arch`` (the official LayerNorm epsilon, 1e-6)."""
    problems = [f"{k}={arch[k]!r}" for k, v in (("block_type", "adaln_zero"), ("mlp_ratio", 4.0),
                                                ("class_dropout_prob", 0.1)) if arch[k] != v]
    if problems:
        raise ValueError("diffusers' DiTTransformer2DModel is adaLN-Zero with MLP ratio 4 and label dropout 0.1; "
                         "this DiT has " + ", ".join(problems))
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": arch["num_heads"],
            "attention_head_dim": arch["hidden_size"] // arch["num_heads"], "in_channels": arch["in_channels"],
            "out_channels": arch["in_channels"] * (2 if arch["learn_sigma"] else 1), "num_layers": arch["depth"],
            "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": arch["input_size"],
            "patch_size": arch["patch_size"], "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": arch["num_classes"], "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": 1e-6}


# ---------------------------------------------------------------- dit_jax workdirs

def _load_workdir(checkpoints: Path, options: dict[str, Any], *, checks: dict[str, Any]) -> LoadedDiT:
    """The EMA weights of the newest intact step in ``checkpoints`` and the DiT of its saved config."""
    from absl import logging

    from dit_jax import checkpointing, convert

    failures = []

    def unreadable(step: int, err: Exception) -> None:
        failures.append(f"step {step}: {checkpointing.error_line(err)}")
        logging.warning("checkpoint %s/%d cannot be read (%s); trying the previous one", checkpoints, step, failures[-1])

    for step in sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), reverse=True):
        try:
            config = _saved_config(checkpoints / str(step))
        except Exception as err:  # any failure to read a step: try the previous one
            unreadable(step, err)
            continue
        arch = config_architecture(config)
        info = {**_describe_arch(arch, "workdir", checkpoints), "step": step}
        _check_against(info, arch, checks, source=f"{checkpoints} (step {step})")
        try:
            ema = restore_ema(checkpoints / str(step))
        except Exception as err:
            unreadable(step, err)
            continue
        net = _build(arch, options)
        convert.load_checked(_param_variables(net), ema, lambda path: ".".join(map(str, path)), pytorch_layout=False,
                             header=f"the EMA parameters of {checkpoints}/{step} do not fit the DiT of its config:")
        return LoadedDiT(net, info)
    if not failures:
        raise FileNotFoundError(f"{checkpoints} holds no checkpoint (no step directories)")
    # The errors themselves, not a verdict: a step that cannot be read here may be intact (permissions, a mount).
    raise FileNotFoundError(f"none of the checkpoints in {checkpoints} can be read: " + "; ".join(failures))


def _saved_config(step_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((step_dir / "config" / "metadata").read_text())  # where Orbax's JsonSave puts the config


def config_architecture(config: Any) -> dict[str, Any]:
    """``DiT`` keyword arguments of a run's config (a ConfigDict or its saved JSON dict)."""
    from dit_jax.models import MODELS

    m = dict(config["model"])
    sizes = MODELS[m["name"]] if m.get("name") else {k: m[k] for k in ("patch_size", "hidden_size", "depth",
                                                                          "num_heads")}
    if m.get("name") and m["name"] not in MODELS:
        raise ValueError(f"the saved config names an unknown model {m['name']!r}")
    return dict(input_size=m["input_size"], in_channels=m["in_channels"], num_classes=m["num_classes"],
                mlp_ratio=m["mlp_ratio"], class_dropout_prob=m["class_dropout_prob"], learn_sigma=m["learn_sigma"],
                block_type=m["block_type"], guidance=m.get("guidance", "official"), **sizes)


def restore_ema(step_dir: Path) -> dict[str, np.ndarray]:
    """The EMA parameters of one checkpoint step as ``{dotted path: numpy array}``; nothing else is read."""
    import jax
    import orbax.checkpoint as ocp

    state_dir = step_dir / "state"
    # The handler's metadata, not the checkpointer's: that one turns any read error into empty metadata.
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    checkpointer = ocp.PyTreeCheckpointer()
    if "ema_params" not in tree:
        raise ValueError(f"{state_dir} is not a dit_jax train state (no ema_params)")
    item = {"ema_params": tree["ema_params"]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                           partial_restore=True))
    flat = {}
    for path, value in jax.tree_util.tree_flatten_with_path(restored["ema_params"])[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        flat[".".join(keys[:-1] if keys[-1] == "value" else keys)] = np.asarray(value)
    return flat


def _param_variables(net: DiT) -> dict[tuple, Any]:
    from flax import nnx

    return dict(nnx.to_flat_state(nnx.state(net, nnx.Param)))


# ---------------------------------------------------------------- fine-tuning (train.init_from)

LABEL_TABLE = "y_embedder.embedding_table.weight"


def init_from_problems(value: str) -> list[str]:
    """What is wrong with a ``train.init_from`` value (empty: nothing): it must be a registry DiT, an
    existing file or folder, or a hub id. Checked before a run starts."""
    if not value:
        return []
    if value in REGISTRY:
        entry = REGISTRY[value]
        if isinstance(entry, HubFolder) and entry.files != DIFFUSERS_DIT_FILES["files"]:
            return [f"train.init_from={value!r} is {entry.what}, not a DiT"]
        return []
    if Path(value).expanduser().exists() or is_hub_id(value):
        return []
    return [f"train.init_from={value!r} is neither an existing file or folder nor a registry name "
            f"({', '.join(n for n in REGISTRY if 'DiT' in n)}) nor a hub id"]


# The architecture fields a fine-tune must share with its checkpoint (``model.*``; the paper sizes are ``model.name``).
SIZE_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads")
SHARED_FIELDS = (*SIZE_FIELDS, "in_channels", "mlp_ratio", "learn_sigma", "block_type")


def architecture_settings(ckpt: str, info: dict[str, Any], run: dict[str, Any], *,
                          heads_known: bool = True) -> str | None:
    """One line naming the ``model.*`` fields to set for the run ``run`` (``DiT`` keyword arguments) to
    fine-tune the checkpoint described by ``info`` (``LoadedDiT.info``); None when they already agree.
    ``heads_known``: False when the checkpoint's heads were not in the file (the run's stood in)."""
    theirs = info["architecture"]
    differ = [k for k in SHARED_FIELDS if theirs[k] != run[k] and (heads_known or k != "num_heads")]
    if not differ:
        return None
    settings = []
    if any(k in SIZE_FIELDS for k in differ):  # a paper model by its name, any other by its sizes
        settings = [f"model.name={info['model']}"] if info["model"] else ["model.name=''"] + [
            f"model.{k}={theirs[k]}" for k in SIZE_FIELDS if heads_known or k != "num_heads"]
    settings += [f"model.{k}={theirs[k]}" for k in differ if k not in SIZE_FIELDS]
    heads = "" if heads_known else " and model.num_heads to the checkpoint's (its file does not record heads)"
    return (f"train.init_from={ckpt!r} is {info['model'] or 'a custom DiT'} ("
            + ", ".join(f"{k} {theirs[k]}" for k in differ) + "), this run's model has "
            + ", ".join(f"{k} {run[k]}" for k in differ) + ": to fine-tune it set "
            + " ".join(f"--config.{s}" for s in settings) + heads
            + " (the resolution and the class count may differ)")


def init_train_state_from(ckpt: str, state: Any, *, architecture: dict[str, Any]) -> tuple[Any, dict[str, list[str]]]:
    """A fresh train state with the weights of ``ckpt`` (any ``load_dit`` form) in its params and EMA.

    ``state`` is a new run's initial state (its optimiser state stays fresh), ``architecture`` its
    model (``config_architecture``). The checkpoint may be at another resolution (the position
    table is fixed and recomputed by the new model; every parameter still fits) or have another
    class count (the label table keeps its fresh initialisation); another architecture is an
    error naming the ``model.*`` fields to set (``architecture_settings``). Arrays keep the
    shardings of ``state``. The run's heads stand in for heads a plain state dict does not record.
    Returns the state and ``{"loaded": [...], "not_loaded": [...]}`` (official names).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dit_jax import convert

    num_classes, heads_known = architecture["num_classes"], True
    try:
        loaded = load_dit(ckpt)
    except ValueError as err:
        if "num_heads" not in str(err):
            raise
        loaded = load_dit(ckpt, num_heads=architecture["num_heads"])  # a non-paper width: heads change no shape
        heads_known = False
    source, info = convert.to_official_state_dict(loaded.model), loaded.info
    del loaded  # only the arrays are needed (a DiT-XL/2 is 2.7 GB)
    wrong = architecture_settings(ckpt, info, architecture, heads_known=heads_known)
    if wrong:
        raise ValueError(wrong)
    flat = list(nnx.to_flat_state(state.params))
    report: dict[str, list[str]] = {"loaded": [], "not_loaded": []}
    misfits, new = [], {}
    for path, var in flat:
        name, leaf = convert.official_name(path), var[...]
        value = convert.from_official_layout(source[name], path, tuple(leaf.shape)) if name in source else None
        if value is None:
            if name == LABEL_TABLE and info["num_classes"] != num_classes:
                report["not_loaded"].append(name)
                new[path] = var
                continue
            misfits.append(f"{name}: checkpoint {tuple(np.shape(source[name])) if name in source else 'missing'}, "
                           f"this run {tuple(leaf.shape)} (our layout)")
            continue
        value = np.asarray(value, dtype=leaf.dtype)
        new[path] = var.replace(jax.make_array_from_callback(value.shape, leaf.sharding, lambda idx, v=value: v[idx]))
        report["loaded"].append(name)
    if misfits:  # the architectures agree: what is left is e.g. label dropout's extra row
        raise ValueError(f"train.init_from={ckpt!r} ({info['model'] or 'a custom DiT'} at {info['image_size']}px, "
                         f"{info['num_classes']} classes) does not fit this run's model in {len(misfits)} tensor(s): "
                         + "; ".join(misfits[:3]) + ("; ..." if len(misfits) > 3 else ""))
    params = nnx.from_flat_state(new)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params)), report


def create_initial_state(config: Any, init_state: Any, *, workdir: str | None = None) -> Any:
    """A new run's first train state: ``init_state()``, with ``config.train.init_from``'s weights when it is set.

    Called only when a run has no checkpoint of its own, so a resumed fine-tune restores its own
    steps and never reads ``init_from`` again. Logs what was and was not loaded, and process 0
    writes it to ``workdir/init_from.json``.
    """
    import json

    import jax
    from absl import logging

    state, init_from = init_state(), config.train.init_from
    if not init_from:
        return state
    state, report = init_train_state_from(init_from, state, architecture=config_architecture(config))
    logging.info("initialised %d tensors from train.init_from=%s (fresh optimiser state; EMA = these weights)",
                 len(report["loaded"]), init_from)
    if report["not_loaded"]:
        logging.warning("not loaded from %s (freshly initialised): %s", init_from, ", ".join(report["not_loaded"]))
    if workdir is not None and jax.process_index() == 0:
        storage.write_atomic(storage.path(workdir) / "init_from.json", json.dumps({"init_from": init_from, **report},
                                                                                  indent=1))
    return state
