"""CIFAR-10 from its "python version": pickled batches, read with an unpickler that runs no code.

A pickle can name any importable callable and have it called while loading (``os.system`` included),
so a downloaded batch is read with :class:`RestrictedUnpickler`, which resolves only what a numpy
array needs. Each batch is a dict with b"data" uint8 (N, 3072) (the 1024 red, then green, then blue
values of a 32x32 image, row-major) and b"labels" (N ints in 0..9). The batches are read from the
extracted ``cifar-10-batches-py/`` folder or straight from ``cifar-10-python.tar.gz``.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ddpm.data.errors import DataError
from ddpm.data.mnist import ImagesAndLabels

try:  # numpy >= 2 moved the module; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

__all__ = ["CIFAR10_FOLDER", "CIFAR10_ARCHIVE", "RestrictedUnpickler", "load_cifar10", "find_cifar10", "read_batch"]

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """What ``_codecs.encode`` does for the bytes a Python 3 protocol-2 pickle holds, and nothing else."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to load _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only numpy's array reconstruction; any other global is refused before it is imported."""

    # The globals a pickled ndarray names (the function that rebuilds it, its class, its dtype), and
    # the latin-1 encoder Python 3 uses to write bytes at protocol 2 (the published batches, written
    # by Python 2, do not need it; batches re-saved by Python 3 do).
    ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None


def read_batch(raw: bytes, source: str) -> ImagesAndLabels:
    """One CIFAR batch pickle -> images uint8 (N, 32, 32, 3), labels int64 (N,). ``source`` names it in errors."""
    try:
        # encoding="bytes": the batches were pickled by Python 2, whose str keys come back as bytes.
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DataError(f"{source} is not a CIFAR-10 batch this loader accepts: {err}") from err
    except Exception as err:  # a damaged pickle fails in many ways (EOFError, ValueError, ...)
        raise DataError(f"{source} is not a readable pickle: {type(err).__name__}: {err}") from err
    if not isinstance(batch, dict):
        raise DataError(f"{source} holds a {type(batch).__name__}, expected a dict with b'data' and b'labels'")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{source}: b'data' must be a uint8 array of shape (N, 3072); found {found}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{source}: b'labels' must be {len(data)} integers in 0..9; found {labels.shape[0]} values")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planar RGB -> (N, H, W, C)
    return ImagesAndLabels(np.ascontiguousarray(images), labels)


def find_cifar10(root: str | Path) -> Path | None:
    """The batches folder or archive at or under ``root`` (a folder or the .tar.gz itself); None if absent."""
    root = Path(root)
    if root.is_file() and root.name.endswith(".tar.gz"):
        return root
    for candidate in (root, root / CIFAR10_FOLDER, root / "cifar10" / CIFAR10_FOLDER):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return candidate
    for candidate in (root / CIFAR10_ARCHIVE, root / "cifar10" / CIFAR10_ARCHIVE):
        if candidate.is_file():
            return candidate
    return None


def _read_from_folder(folder: Path, names: list[str]) -> list[ImagesAndLabels]:
    batches = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing: {folder} must hold {', '.join(names)}")
        batches.append(read_batch(path.read_bytes(), str(path)))
    return batches


def _read_from_archive(archive: Path, names: list[str]) -> list[ImagesAndLabels]:
    # Read members into memory rather than extracting: nothing in the archive chooses where we write.
    found: dict[str, ImagesAndLabels] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in names:
                    raw = tar.extractfile(member).read()
                    found[name] = read_batch(raw, f"{archive}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{archive} is not a readable .tar.gz ({err}); delete it and download it again") from err
    missing = [name for name in names if name not in found]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}: not the CIFAR-10 python archive")
    return [found[name] for name in names]


def load_cifar10(root: str | Path, split: Literal["train", "test"] = "train") -> ImagesAndLabels:
    """CIFAR-10: images uint8 (N, 32, 32, 3) RGB, labels int64 (N,) in 0..9 (N = 50000 train, 10000 test).

    ``root``: the ``cifar-10-batches-py`` folder, a folder containing it or the archive, or the
    ``cifar-10-python.tar.gz`` file.
    """
    if split not in _BATCHES:
        raise DataError(f"split={split!r} is not allowed; choose 'train' or 'test'")
    source = find_cifar10(root)
    if source is None:
        raise DataError(
            f"no CIFAR-10 in {root}: expected {CIFAR10_FOLDER}/ (data_batch_1..5, test_batch) or {CIFAR10_ARCHIVE}"
        )
    names = _BATCHES[split]
    batches = _read_from_archive(source, names) if source.is_file() else _read_from_folder(source, names)
    return ImagesAndLabels(
        np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches])
    )
