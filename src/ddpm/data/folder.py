"""Any folder of images (PNG, JPEG, WebP), decoded once with Pillow into one uint8 array.

Files are found recursively and sorted by their path relative to the folder, so the same folder
always gives the same order. Each image is turned upright by its EXIF orientation, converted to
grayscale or RGB, resized so its shorter side is ``image_size`` (bicubic, which Pillow antialiases
when shrinking) and centre-cropped to a square. Files Pillow cannot read are skipped and reported.

Sizes are checked from each file's header before it is decoded: an image above Pillow's
``Image.MAX_IMAGE_PIXELS`` (a possible decompression bomb) is refused; a JPEG four or more times
larger than needed is decoded at 1/2, 1/4 or 1/8 of its size by the decoder itself; and a folder
whose size is taken from a huge first image, or whose decoded images would not fit in memory, is
refused before anything is allocated.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ddpm.data._checks import require_channels, require_int
from ddpm.data.errors import DataError
from ddpm.resources import check_fits

__all__ = ["IMAGE_SUFFIXES", "FolderImages", "list_image_files", "load_image_folder", "skipped_message"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})  # plus the 16-bit "I;16*" family
_SHOWN_SKIPPED = 5  # names listed in the skipped-files message before "and N more"
MAX_OWN_SIZE = 1024  # the largest size a folder is read at when image_size is None (its first image's)


class FolderImages(NamedTuple):
    """The decoded images and what could not be decoded.

    images: uint8 (N, S, S, C); files: the N files read, in order; skipped: files Pillow could not
    read; total: files considered (N + len(skipped)); resized, converted: how many of the N were not
    S x S, and how many were colour made gray or gray made colour.
    """

    images: np.ndarray
    files: tuple[Path, ...]
    skipped: tuple[Path, ...]
    total: int
    resized: int = 0
    converted: int = 0


def list_image_files(root: str | Path) -> list[Path]:
    """Image files under root, recursively, sorted by relative path (case-insensitive suffix match)."""
    root = Path(root)
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def skipped_message(skipped: Sequence[Path], total: int) -> str:
    """'skipped 2 of 10 files that Pillow could not read: a.png, b.png' (at most five names shown)."""
    names = ", ".join(p.name for p in skipped[:_SHOWN_SKIPPED])
    more = f" and {len(skipped) - _SHOWN_SKIPPED} more" if len(skipped) > _SHOWN_SKIPPED else ""
    return f"skipped {len(skipped)} of {total} files that Pillow could not read: {names}{more}"


def _open(path: Path) -> Image.Image:
    """Open one file without decoding it (size and mode are read from its header). Raises what Pillow
    raises for unreadable files, and DataError for an image above Image.MAX_IMAGE_PIXELS."""
    with _refusing_bombs(path):
        return Image.open(path)


def _decode(image: Image.Image, path: Path, size: int) -> Image.Image:
    """Decode an opened image, upright; smaller than full size where the format allows it (JPEG: the
    decoder scales by 1/2, 1/4 or 1/8, far cheaper than a full decode), but no smaller than 2 * size."""
    with _refusing_bombs(path):  # some formats (GIF frames) check sizes again while decoding
        # The decoder's scaling averages blocks (a box filter); leaving at least the last halving to
        # the antialiased bicubic resize keeps the result within a few levels of the full decode's.
        image.draft(None, (2 * size, 2 * size))  # a no-op for formats other than JPEG
        image.load()  # decode now, inside the try of the caller, rather than lazily later
        return ImageOps.exif_transpose(image)


@contextmanager
def _refusing_bombs(path: Path) -> Iterator[None]:
    """Pillow's decompression-bomb warning (above Image.MAX_IMAGE_PIXELS) and error (above twice that)
    as one DataError naming the file; Pillow's text gives the image's pixel count and the limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(f"{path} is refused as a possible decompression bomb: {str(err).rstrip('.')} "
                            "(PIL.Image.MAX_IMAGE_PIXELS); shrink the image or remove it from the folder") from err


def _own_size(path: Path, image: Image.Image) -> int:
    """The size a folder is read at when image_size is None: the first image's shorter side, if small."""
    size = min(image.size)
    if size > MAX_OWN_SIZE:
        raise DataError(f"{path} is {image.width}x{image.height}, so its folder would be read at {size}x{size}, "
                        f"above {MAX_OWN_SIZE}: set --image-size; ddpm reads a folder at its first image's size "
                        "unless told")
    return size


def _check_fits(root: Path, count: int, size: int, channels: int, first: Path | None) -> None:
    """Refuse a folder whose images, as the float32 tensor they become, exceed this machine's memory.
    first: the image the size was taken from, when image_size was not given."""
    origin = f" (the size of its first image, {first.name})" if first else ""
    check_fits(f"{root}: {count} images of {channels}x{size}x{size}{origin} as float32",
               4.0 * count * channels * size * size, "lower --image-size or --num-examples", error=DataError)


def _is_gray(image: Image.Image) -> bool:
    return image.mode in _GRAY_MODES or image.mode.startswith("I;16")


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB", compositing transparency over white and scaling 16-bit gray to 8 bits."""
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow's convert clips 16-bit values at 255; scale instead (65535 / 257 = 255).
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels carry arbitrary colour values; white is the neutral backdrop.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image_folder(
    root: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    files: Sequence[Path] | None = None,
) -> FolderImages:
    """Decode the images of a folder into uint8 (N, image_size, image_size, channels).

    image_size: None takes the shorter side of the first readable image (at most MAX_OWN_SIZE).
    channels: 1 (gray) or 3 (RGB); None takes 1 when the first readable image is grayscale, else 3.
    files: a subset of :func:`list_image_files` to read instead of all of them. Raises DataError
    when the folder does not exist, holds no images, or none of them can be read; and, before
    decoding, for an image above Image.MAX_IMAGE_PIXELS, a first image above MAX_OWN_SIZE when
    image_size is None, or images whose float32 tensor would exceed this machine's memory.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    require_channels(channels, optional=True)
    require_int("image_size", image_size, optional=True)
    files = list(list_image_files(root) if files is None else files)
    if not files:
        raise DataError(f"{root} holds no images: looked for {', '.join(sorted(IMAGE_SUFFIXES))} files, recursively")
    read: list[Path] = []
    skipped: list[Path] = []
    out: np.ndarray | None = None
    resized = converted = 0
    for path in tqdm(files, desc=f"reading {root}", unit="image", leave=False, delay=2, dynamic_ncols=True,
                     file=sys.stderr):  # shown only when the folder takes more than 2 s
        try:
            with _open(path) as image:
                if out is None:  # sizes from the header, so what cannot fit is refused before decoding
                    size = image_size or _own_size(path, image)
                    depth = channels or (1 if _is_gray(image) else 3)
                    _check_fits(root, len(files), size, depth, None if image_size else path)
                stored_size = image.size
                image = _decode(image, path, size)
        except DataError:  # a refusal, not an unreadable file
            raise
        except (OSError, ValueError, SyntaxError):
            skipped.append(path)
            continue
        if out is None:  # the first readable image fixes whatever was left open
            image_size, channels = size, depth
            out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
        resized += stored_size != (image_size, image_size)
        converted += _is_gray(image) != (channels == 1)
        pixels = np.asarray(_resize_center_crop(_to_mode(image, "L" if channels == 1 else "RGB"), image_size))
        out[len(read)] = pixels.reshape(image_size, image_size, channels)
        read.append(path)
    if out is None:
        raise DataError(
            f"none of the {len(files)} image files in {root} could be read by Pillow (first: {files[0].name})"
        )
    return FolderImages(out[: len(read)], tuple(read), tuple(skipped), len(files), resized, converted)
