"""One entry point, :func:`load_dataset`: a built-in name or a path in, a whole dataset in memory out.

The datasets here are small enough to hold as one tensor, which is also the fastest data path and
makes resuming exact: a training run's data position is just an index into ``Dataset.data``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ddpm.catalog import DATASETS, is_generated
from ddpm.data import synthetic
from ddpm.data._checks import require_channels, require_int
from ddpm.data.arrays import array_to_tensor, load_array
from ddpm.data.cifar import find_cifar10, load_cifar10
from ddpm.data.download import resolve_data_path
from ddpm.data.errors import DataError, NoSplitsError
from ddpm.data.folder import list_image_files, load_image_folder, skipped_message
from ddpm.data.mnist import ImagesAndLabels, find_mnist_files, load_mnist
from ddpm.data.transforms import convert_channels, resize_center_crop, uint8_to_float

__all__ = ["Dataset", "DATASETS", "is_generated", "list_datasets", "load_dataset"]

Kind = Literal["image", "points"]
Split = Literal["train", "test"]

# Generated sets: the generator, its default n, and whether it makes images.
_GENERATED: dict[str, tuple[Callable[..., Tensor], int, bool]] = {
    "square": (synthetic.make_square, 1, True),
    "gradients": (synthetic.make_gradients, 10_000, True),
    "moons": (synthetic.make_moons, 10_000, False),
    "swissroll": (synthetic.make_swissroll, 10_000, False),
    "8gaussians": (synthetic.make_8gaussians, 10_000, False),
    "checkerboard": (synthetic.make_checkerboard, 10_000, False),
}
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
# The names of CIFAR-10's labels 0..9, as its batches.meta lists them.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# A generated set's "test" split is drawn with seed ^ this constant, so it never repeats "train"
# for the same seed. It stays below 2**32 because torch's CPU generator keeps only 32 bits of a seed.
_TEST_SEED_MASK = 0x7E57_5EED


@dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory, in the package's conventions.

    data: float32 images (N, C, H, W) in [-1, 1] or points (N, D).
    labels: int64 (N,) class indices into ``classes``, or None where the source has no classes.
    notes: one-line messages for the user (files skipped, conversions made); the CLI prints them.
    skipped: files of an image folder that Pillow could not read.
    classes: the class names, label i being classes[i] (MNIST "0".."9"; a folder's subfolder names).
    """

    data: Tensor
    kind: Kind
    name: str
    labels: Tensor | None = None
    notes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None

    def subset(self, index: Tensor) -> "Dataset":
        """The examples at ``index`` (a LongTensor), with their labels."""
        labels = self.labels[index] if self.labels is not None else None
        return Dataset(self.data[index], self.kind, self.name, labels, self.notes, self.skipped, self.classes)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one item: (C, H, W) or (D,)."""
        return tuple(self.data.shape[1:])


def list_datasets() -> dict[str, str]:
    """Built-in dataset name -> one-line description (paths to folders and arrays work too)."""
    return dict(DATASETS)


def load_dataset(
    name_or_path: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    seed: int = 0,
    n: int | None = None,
    split: Split = "train",
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> Dataset:
    """Load a built-in dataset by name, or the dataset at a path, as one float32 tensor.

    name_or_path: a name of :data:`DATASETS`, or a path: an image folder, a .npy/.npz file, a
        folder holding the MNIST IDX files or CIFAR-10 batches, or the CIFAR-10 .tar.gz. Names
        win: write ./mnist for a folder that is called like one.
    image_size, channels: the image shape wanted. None keeps the source's own (for a folder: the
        first image's shorter side and mode). Fixed-size sources (MNIST, CIFAR-10, arrays) are
        resized (antialiased bicubic, shorter side then centre crop) and converted (RGB to gray by
        BT.601 luma, gray to RGB by repeating); point sets accept neither.
    seed: seeds generated sets and the choice of a subset.
    n: generated sets: how many to draw (default 1 square, else 10000); stored sets: a random
        subset of n items (kept in stored order), None for all.
    split: "train" or "test"; for generated sets "test" is another draw (seed ^ 0x7E575EED).
    data_dir, cache_dir, download: where MNIST/CIFAR-10 come from (see resolve_data_path).
    Raises DataError with a one-line message for every problem with the name, path or files.
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} is not allowed; choose 'train' or 'test'")
    require_int("n", n, optional=True)
    require_int("image_size", image_size, optional=True)
    require_channels(channels, optional=True)
    name = str(name_or_path)
    if name in _GENERATED:
        return _generated(name, image_size, channels, seed, n, split)
    if name in ("mnist", "cifar10"):
        root = resolve_data_path(name, data_dir=data_dir, cache_dir=cache_dir, split=split, download=download)
        return _stored_images(name, root, image_size, channels, seed, n, split)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise DataError(
            f"unknown dataset {name!r}: not one of {', '.join(DATASETS)}, and no file or folder by that name"
        )
    return _from_path(path, image_size, channels, seed, n, split)


def _generated(name: str, image_size: int | None, channels: int | None, seed: int, n: int | None,
               split: str) -> Dataset:
    make, default_n, is_image = _GENERATED[name]
    seed = seed ^ _TEST_SEED_MASK if split == "test" else seed
    if not is_image:
        _refuse_image_options(name, image_size, channels)
        return Dataset(make(n or default_n, seed=seed), "points", name)
    options = {k: v for k, v in (("image_size", image_size), ("channels", channels)) if v is not None}
    return Dataset(make(n or default_n, seed=seed, **options), "image", name)


def _refuse_image_options(name: str, image_size: int | None, channels: int | None) -> None:
    if image_size is not None or channels is not None:
        raise DataError(f"{name} is a set of points; image_size and channels apply only to images")


def _refuse_split(source: str, split: str) -> None:
    if split != "train":
        raise NoSplitsError(f"split={split!r}: {source} has no splits; only mnist, cifar10 and generated sets do")


def _from_path(path: Path, image_size: int | None, channels: int | None, seed: int, n: int | None,
               split: str) -> Dataset:
    if path.is_dir():
        # Either split's files mark an MNIST folder; load_mnist then says if this split is missing.
        if any(find_mnist_files(path, s) is not None for s in ("train", "test")):
            return _stored_images("mnist", path, image_size, channels, seed, n, split)
        if find_cifar10(path) is not None:
            return _stored_images("cifar10", path, image_size, channels, seed, n, split)
        _refuse_split(str(path), split)
        return _image_folder(path, image_size, channels, seed, n)
    if path.name.endswith(".tar.gz"):
        return _stored_images("cifar10", path, image_size, channels, seed, n, split)
    if path.suffix in (".npy", ".npz"):
        _refuse_split(str(path), split)
        return _array_file(path, image_size, channels, seed, n)
    raise DataError(
        f"{path} is not a dataset this loader reads: use an image folder, a .npy/.npz file, "
        "the MNIST or CIFAR-10 files, or a built-in name"
    )


def _subset(total: int, n: int | None, seed: int, source: str) -> Tensor | None:
    """Sorted indices of a random subset of n out of total, or None for everything."""
    if n is None or n == total:
        return None
    if n > total:
        raise DataError(f"n={n} is more than the {total} items in {source}; ask for at most {total} "
                        f"(in training: data.num_examples, --num-examples)")
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return chosen.sort().values


def _shape_images(images: Tensor, image_size: int | None, channels: int | None) -> tuple[Tensor, tuple[str, ...]]:
    """Apply the requested channels and size to (N, C, H, W); returns the images and what was done."""
    notes = []
    if channels is not None and channels != images.shape[1]:
        notes.append(f"converted {images.shape[1]} channel(s) to {channels}")
        # Gray first when reducing, so the resize handles one channel instead of three.
        images = convert_channels(images, channels) if channels < images.shape[1] else images
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        notes.append(f"resized {images.shape[-1]}x{images.shape[-2]} images to {image_size}x{image_size}")
        images = resize_center_crop(images, image_size)
    if channels is not None and channels > images.shape[1]:
        images = convert_channels(images, channels)
    return images, tuple(notes)


def _stored_images(name: str, root: Path, image_size: int | None, channels: int | None, seed: int,
                   n: int | None, split: str) -> Dataset:
    stored: ImagesAndLabels = load_mnist(root, split) if name == "mnist" else load_cifar10(root, split)
    index = _subset(len(stored.images), n, seed, name)
    images, labels = stored.images, stored.labels
    if index is not None:
        images, labels = images[index.numpy()], labels[index.numpy()]
    data, notes = _shape_images(uint8_to_float(images), image_size, channels)
    classes = MNIST_CLASSES if name == "mnist" else CIFAR10_CLASSES
    return Dataset(data, "image", name, torch.from_numpy(labels), notes, classes=classes)


def _image_folder(path: Path, image_size: int | None, channels: int | None, seed: int, n: int | None) -> Dataset:
    files = all_files = list_image_files(path)
    index = _subset(len(files), n, seed, str(path)) if files else None
    if index is not None:
        files = [files[i] for i in index.tolist()]
    folder = load_image_folder(path, image_size=image_size, channels=channels, files=files)
    count, size, depth = len(folder.files), folder.images.shape[1], folder.images.shape[3]
    notes = [skipped_message(folder.skipped, folder.total)] if folder.skipped else []
    if folder.converted:
        notes.append(f"converted {folder.converted} of {count} images to {'gray' if depth == 1 else 'colour'} "
                     f"(data.channels, --channels)")
    if folder.resized:
        notes.append(f"resized and centre-cropped {folder.resized} of {count} images to {size}x{size} "
                     f"(data.image_size, --image-size)")
    skipped = tuple(str(p) for p in folder.skipped)
    labels, classes = folder_classes(path, folder.files, all_files)
    return Dataset(uint8_to_float(folder.images), "image", path.name, labels, tuple(notes), skipped, classes)


def _array_file(path: Path, image_size: int | None, channels: int | None, seed: int, n: int | None) -> Dataset:
    stored = load_array(path)
    index = _subset(len(stored.data), n, seed, str(path))
    array = stored.data
    labels, classes = _classes_of(stored.labels, path) if stored.labels is not None else (None, None)
    if index is not None:
        array = array[index.numpy()]
        labels = labels[index] if labels is not None else None
    data, kind = array_to_tensor(array, str(path))
    notes: tuple[str, ...] = ()
    if kind == "points":
        _refuse_image_options(path.name, image_size, channels)
    else:
        data, notes = _shape_images(data, image_size, channels)
    return Dataset(data, kind, path.name, labels, notes, classes=classes)


def _classes_of(labels: np.ndarray, path: Path) -> tuple[Tensor, tuple[str, ...]]:
    """An array file's labels as indices into its sorted distinct values, and those values as names:
    integers [7, 3, 7] become [1, 0, 1] with classes ("3", "7"); strings alike, in sorted order."""
    if labels.dtype.kind not in "iuUS":
        raise DataError(f"{path}: labels must be integers or strings; got dtype {labels.dtype}")
    values, index = np.unique(labels, return_inverse=True)
    names = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.tolist())
    return torch.from_numpy(index.reshape(-1).astype(np.int64)), names


def folder_classes(root: Path, files: Sequence[Path], all_files: Sequence[Path]
                   ) -> tuple[Tensor | None, tuple[str, ...] | None]:
    """The class of each of ``files`` in a folder laid out as ROOT/CLASS/.../IMAGE (torchvision's
    ImageFolder layout): its first subfolder's name. The classes are the subfolders of ``all_files``
    (the whole folder), sorted by name. (None, None) unless every image lies in a subfolder."""
    if not all_files or any(len(f.relative_to(root).parts) < 2 for f in all_files):
        return None, None
    classes = tuple(sorted({f.relative_to(root).parts[0] for f in all_files}))
    number = {name: i for i, name in enumerate(classes)}
    return torch.tensor([number[f.relative_to(root).parts[0]] for f in files], dtype=torch.long), classes
