"""MNIST: the IDX file format, read by hand with numpy, and the four files of the database.

An IDX file is a big-endian header, then the values row-major: two zero bytes, a type code, the
number of dimensions d, d big-endian uint32 sizes. Files may be gzip-compressed (the published form)
or not. Every check here names the file, what was expected and what was found, because a truncated
download is the usual way these files go wrong.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from ddpm.data.errors import DataError

__all__ = ["ImagesAndLabels", "MNIST_FILES", "read_idx", "find_mnist_files", "load_mnist"]

# IDX type code -> numpy dtype (big-endian, as stored).
_IDX_DTYPES = {
    0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

Split = Literal["train", "test"]

# split -> (images file, labels file), by their published names; md5 sums are of the .gz files.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


class ImagesAndLabels(NamedTuple):
    """A labelled image set as stored: images uint8 (N, H, W) or (N, H, W, C), labels int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path} is not a complete gzip file ({err}); delete it and download it again") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def read_idx(path: str | Path, *, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into an array of its stored shape and type.

    ``magic``: the expected 32-bit magic number (2051 for MNIST images, 2049 for labels), or None
    to accept any valid type code. Raises DataError on a bad magic number or a byte count that does
    not match the dimensions (a truncated or padded file).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path} is too short to be an IDX file: {len(data)} bytes, less than its 4-byte magic number")
    found_magic = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if magic is not None and found_magic != magic:
        raise DataError(f"{path} has magic number {found_magic}, expected {magic}: not the right IDX file")
    if data[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path} has magic number {found_magic:#010x}, which is not a valid IDX header")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its {header_size}-byte header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "longer than its header says"
        dims = "x".join(map(str, shape))
        raise DataError(
            f"{path} is {problem}: a {dims} IDX array needs {expected} bytes, found {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)  # native order, writable


def _find_one(directory: Path, stem: str) -> Path | None:
    # Published names end in .gz; unpacked copies drop it, and some mirrors write "train-images.idx3-ubyte".
    dotted = stem.replace("-idx", ".idx", 1)
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (directory / name).is_file():
            return directory / name
    return None


def find_mnist_files(root: str | Path, split: Split = "train") -> tuple[Path, Path] | None:
    """The (images, labels) files of ``split`` under root, root/mnist or root/MNIST/raw; None if absent."""
    _check_split(split)
    root = Path(root)
    for directory in (root, root / "mnist", root / "MNIST" / "raw"):
        images, labels = (_find_one(directory, stem) for stem in MNIST_FILES[split])
        if images is not None and labels is not None:
            return images, labels
    return None


def _check_split(split: str) -> None:
    if split not in MNIST_FILES:
        raise DataError(f"split={split!r} is not allowed; choose 'train' or 'test'")


def load_mnist(root: str | Path, split: Split = "train") -> ImagesAndLabels:
    """MNIST from the IDX files in ``root``: images uint8 (N, 28, 28), labels int64 (N,) in 0..9.

    N is 60000 for "train" and 10000 for "test". Raises DataError when the files are missing,
    damaged, or disagree with each other.
    """
    files = find_mnist_files(root, split)
    if files is None:
        wanted = " and ".join(f"{stem}[.gz]" for stem in MNIST_FILES[split])
        raise DataError(f"no MNIST {split} files in {root}: expected {wanted}")
    images_path, labels_path = files
    images = read_idx(images_path, magic=2051)
    labels = read_idx(labels_path, magic=2049)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds images of size {images.shape[1:]}, expected 28x28")
    if len(labels) != len(images):
        raise DataError(f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path} has label {int(labels.max())}; MNIST labels are 0..9")
    return ImagesAndLabels(images, labels.astype(np.int64))
