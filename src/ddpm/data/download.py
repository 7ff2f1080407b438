"""Checked downloads of MNIST and CIFAR-10 into a cache, and where each dataset's files are found.

Downloads stream into a temporary file beside the target, hash it on the way, and rename it into
place only when the md5 matches the published one: an interrupted or corrupted download never leaves
a file that looks complete. The cache is ``$DDPM_DATA`` or ``~/.cache/ddpm/data``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from urllib.request import urlopen

from tqdm.auto import tqdm

from ddpm.data.cifar import CIFAR10_ARCHIVE, CIFAR10_MD5, find_cifar10
from ddpm.data.errors import ChecksumError, DataError, DownloadError
from ddpm.data.mnist import MNIST_FILES, MNIST_MD5, find_mnist_files

__all__ = [
    "MNIST_MIRRORS", "CIFAR10_URL", "default_cache_dir", "md5_of", "verify_md5", "download_file",
    "download_mnist", "download_cifar10", "resolve_data_path",
]

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


def default_cache_dir() -> Path:
    """``$DDPM_DATA`` when set, else ``~/.cache/ddpm/data``."""
    return Path(os.environ.get("DDPM_DATA") or Path.home() / ".cache" / "ddpm" / "data")


def md5_of(path: str | Path) -> str:
    """The hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str | Path, expected: str) -> None:
    """Raise ChecksumError unless the file's md5 is ``expected``."""
    found = md5_of(path)
    if found != expected:
        raise ChecksumError(f"checksum mismatch for {path}: md5 {found}, expected {expected}; the file is corrupt")


def _fetch(url: str, target: Path, md5: str) -> None:
    """Stream url into a temporary file in target's folder; rename it to target only if the md5 matches."""
    digest = hashlib.md5()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=_TIMEOUT_S) as response:
            headers = getattr(response, "headers", None)  # what urlopen returns has them; a stand-in may not
            size = headers.get("Content-Length") if headers is not None else None
            with tqdm(total=int(size) if size and size.isdigit() else None, desc=f"downloading {target.name}",
                      unit="B", unit_scale=True, leave=False, delay=1, dynamic_ncols=True,  # only if it lasts
                      file=sys.stderr) as bar:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ChecksumError(
                f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}; nothing was saved"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def download_file(urls: Sequence[str], target: str | Path, md5: str) -> Path:
    """Download the first mirror in ``urls`` that serves a file with this md5 to ``target``.

    Unreachable mirrors are skipped. Raises ChecksumError when a mirror served wrong bytes and none
    served right ones, DownloadError when none could be reached.
    """
    target = Path(target)
    if not urls:
        raise ValueError("download_file needs at least one URL")
    try:  # before any mirror is tried, so that a folder we cannot write is not blamed on the mirrors
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as err:
        raise DownloadError(f"cannot write the download to {target.parent} ({err.strerror or err}); set "
                            f"DDPM_DATA to a folder you can write, or give the data's folder (--data-dir)") from None
    errors: list[str] = []
    mismatch: ChecksumError | None = None
    for url in urls:
        try:
            _fetch(url, target, md5)
            return target
        except ChecksumError as err:
            mismatch = err
        except (OSError, http.client.HTTPException) as err:  # URLError (DNS, refused, HTTP 404) is an OSError
            errors.append(str(getattr(err, "reason", err)))
    if mismatch is not None:
        raise mismatch
    mirrors = "1 mirror" if len(urls) == 1 else f"{len(urls)} mirrors"
    raise DownloadError(f"could not download {target.name} from {mirrors} (last error: {errors[-1]})")


def download_mnist(cache_dir: str | Path | None = None) -> Path:
    """The four MNIST .gz files in ``cache_dir``/mnist, downloading the missing ones; returns that folder."""
    folder = Path(cache_dir or default_cache_dir()) / "mnist"
    for stems in MNIST_FILES.values():
        for stem in stems:
            name = stem + ".gz"
            if not (folder / name).is_file():
                download_file([mirror + name for mirror in MNIST_MIRRORS], folder / name, MNIST_MD5[name])
    return folder


def download_cifar10(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``/cifar10/cifar-10-python.tar.gz, downloaded (170 MB) if missing; returns its path."""
    target = Path(cache_dir or default_cache_dir()) / "cifar10" / CIFAR10_ARCHIVE
    if not target.is_file():
        download_file([CIFAR10_URL], target, CIFAR10_MD5)
    return target


def _expected_files(name: str) -> str:
    if name == "mnist":
        return ", ".join(stem + ".gz" for stems in MNIST_FILES.values() for stem in stems)
    return CIFAR10_ARCHIVE


def resolve_data_path(
    name: Literal["mnist", "cifar10"],
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    split: Literal["train", "test"] = "train",
    download: bool = True,
) -> Path:
    """Where to read MNIST or CIFAR-10 from: ``data_dir`` if given, else the cache, else a download.

    With ``data_dir`` (the CLI's ``--data DIR``) the files must be there: asking for a folder and
    silently reading another would hide a typo. Otherwise the cache is searched and, when the files
    are missing and ``download`` is true, they are downloaded into it. Returns the path to hand to
    :func:`load_mnist` or :func:`load_cifar10`. Raises DataError with one line saying which files
    to put where when nothing is found and the download fails.
    """
    if name not in ("mnist", "cifar10"):
        raise DataError(f"{name!r} has no download; choose 'mnist' or 'cifar10'")
    find = (lambda root: find_mnist_files(root, split)) if name == "mnist" else find_cifar10
    if data_dir is not None:
        if find(data_dir) is None:
            raise DataError(f"no {name} files in {data_dir}: put {_expected_files(name)} there")
        return Path(data_dir)
    cache = Path(cache_dir or default_cache_dir())
    folder = cache / name
    if find(folder) is not None:
        return folder
    if not download:
        raise DataError(f"{name} is not in {folder}: put {_expected_files(name)} there, or allow the download")
    try:
        return download_mnist(cache) if name == "mnist" else download_cifar10(cache)
    except DownloadError as err:
        raise DataError(
            f"{err}; put {_expected_files(name)} in {folder} (or pass --data DIR pointing at them)"
        ) from err
