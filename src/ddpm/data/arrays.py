"""Datasets stored as numpy ``.npy`` / ``.npz`` files: points (N, D) or images (N, H, W[, C]).

Loaded with ``allow_pickle=False``: an object array would need pickle, which can run code. Each
array's header is read first, so that a file whose header declares more bytes than it holds, or more
than this machine's memory, is refused in one line before numpy allocates anything.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ddpm.data.errors import DataError
from ddpm.data.transforms import uint8_to_float
from ddpm.resources import check_fits

__all__ = ["ArrayData", "load_array", "array_to_tensor"]

_DATA_KEYS = ("data", "images", "points", "x")  # the array an .npz's dataset is read from, first found
_LABEL_KEYS = ("labels", "y")
_ZIP_PREFIX = b"PK\x03\x04"  # what np.load takes for an .npz (a zip whose first entry starts here)


class ArrayData(NamedTuple):
    """What a .npy/.npz holds: ``data`` as stored, ``labels`` (N,) or None."""

    data: np.ndarray
    labels: np.ndarray | None


def load_array(path: str | Path) -> ArrayData:
    """Read a .npy (the data) or .npz (data under "data"/"images"/"points"/"x" or its only array;
    labels under "labels"/"y" when present)."""
    path = Path(path)
    _check_headers(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:  # numpy's refusal of object arrays, or a malformed header
        raise DataError(f"{path} cannot be read without pickle or is malformed: {err}") from err
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if isinstance(loaded, np.ndarray):
        return ArrayData(loaded, None)
    with loaded:
        keys = list(loaded.files)
        data_key = next((k for k in _DATA_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if data_key is None:
            raise DataError(f"{path} holds arrays {keys}; name the data one of {', '.join(_DATA_KEYS)}")
        label_key = next((k for k in _LABEL_KEYS if k in keys and k != data_key), None)
        try:
            data = loaded[data_key]
            labels = loaded[label_key] if label_key else None
        except ValueError as err:
            raise DataError(f"{path} cannot be read without pickle: {err}") from err
    if labels is not None and labels.shape != (len(data),):
        raise DataError(f"{path}: {label_key!r} has shape {labels.shape}, expected ({len(data)},) to match the data")
    return ArrayData(data, labels)


def _check_headers(path: Path) -> None:
    """Read the .npy header of the file, or of each .npy member of an .npz, and refuse what it declares
    when the file cannot hold it or memory cannot. Other files are left to np.load to judge."""
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(len(np.lib.format.MAGIC_PREFIX))
            fp.seek(0)
            if prefix == np.lib.format.MAGIC_PREFIX:
                _check_header(fp, os.fstat(fp.fileno()).st_size, str(path), "the file")
            elif prefix.startswith(_ZIP_PREFIX):
                with zipfile.ZipFile(fp) as archive:
                    for member in archive.infolist():
                        if member.filename.endswith(".npy"):  # what np.load reads as arrays
                            with archive.open(member) as stream:
                                _check_header(stream, member.file_size, f"{path} (member {member.filename})",
                                              "the member")
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def _check_header(fp: BinaryIO, size: int, source: str, holder: str) -> None:
    """fp: at the start of a .npy stream of ``size`` bytes; source, holder: how messages name it."""
    try:
        version = np.lib.format.read_magic(fp)
        if version not in ((1, 0), (2, 0), (3, 0)):
            return  # np.load refuses it, naming the versions it reads
        # 3.0 differs from 2.0 only in the header's text encoding (utf8, for field names).
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fp)
    except ValueError as err:  # short or malformed magic or header
        raise DataError(f"{source} has a malformed .npy header: {err}") from err
    if dtype.hasobject:  # stored pickled, so its size is not in the header; np.load refuses it anyway
        return
    count = math.prod(shape)
    declared, held = count * dtype.itemsize, size - fp.tell()
    if declared > held:
        raise DataError(f"{source} is damaged or truncated: the header declares {declared} bytes "
                        f"(shape {shape}, {dtype}), {holder} holds {held}; write or download it again")
    # At least the array as stored, or the float32 tensor made from it, whichever is larger.
    check_fits(f"{source}: the array its header declares, of shape {shape} ({dtype}),", max(declared, 4 * count),
               "store fewer or smaller examples in the file", error=DataError)


def array_to_tensor(array: np.ndarray, source: str) -> tuple[Tensor, str]:
    """Convert to the package's conventions; returns (tensor, kind).

    (N, D) real numbers -> points float32 (N, D), values kept. (N, H, W) or (N, H, W, C) with C in
    {1, 3}, uint8 or float in [0, 1] -> images float32 (N, C, H, W) in [-1, 1].
    """
    if array.ndim == 2:
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise DataError(f"{source}: points must be real numbers; got dtype {array.dtype}")
        points = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if not torch.isfinite(points).all():
            raise DataError(f"{source}: points contain NaN or infinite values")
        return points, "points"
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] not in (1, 3)):
        raise DataError(
            f"{source} has shape {array.shape}; expected points (N, D) or images (N, H, W) or (N, H, W, C) "
            "with C 1 or 3 (channels last)"
        )
    if array.dtype == np.uint8:
        return uint8_to_float(array), "image"
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
            raise DataError(f"{source}: float images must lie in [0, 1]; found values from {lo:g} to {hi:g}")
        images = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
        return (images * 2 - 1).contiguous(), "image"
    raise DataError(f"{source}: images must be uint8 (0..255) or float in [0, 1]; got dtype {array.dtype}")
