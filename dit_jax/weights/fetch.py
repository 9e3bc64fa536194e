"""Every file the project fetches: one registry, one cache, resumable checked downloads (no JAX).

``REGISTRY`` names each fetchable file (URL, and the size or SHA-256 where known) or Hugging
Face hub folder; ``fetch(name)`` returns its local path under ``cache_dir()`` (the environment
variable ``DIT_JAX_CACHE``, default ``~/.cache/dit_jax``), downloading it first if needed.
Downloads are resumable and atomic: bytes go to ``<file>.partial`` (continued with an HTTP
``Range`` request after an interruption or a killed run) and the file gets its final name only
once its size, checksum and format are checked (``format_problem``: an HTML error page or a
body cut short never enters the cache). ``DIT_JAX_MIRROR`` (a base URL) fetches every file from
``<mirror>/<name>`` instead. With no network (or ``DIT_JAX_OFFLINE=1``) a missing file is an
immediate error naming the URL and the exact path to put the file at. ``read_weights`` reads a
weight file as numpy arrays (``.safetensors`` without PyTorch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import http.client
import json
import os
import struct
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax import storage

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


def name_or_path(value: str, names: tuple[str, ...] = ()) -> str:
    """What a user typed for a file or folder that may also be a name: ``value`` as typed when it is one of
    ``names`` or reads as a hub id, otherwise the path resolved once (``~``, relative, trailing slash,
    ``gs://``) as ``storage.absolute`` resolves it."""
    return value if value in names or is_hub_id(value) else storage.absolute(value)


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
    return torch_state_dict(torch_load(path), path)


def torch_load(path: str) -> Any:
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


def torch_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
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
