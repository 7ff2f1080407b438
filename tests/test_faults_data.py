"""Hostile or damaged data is refused in one line, from headers, before anything is allocated:
.npy/.npz headers that declare more than the file holds or than memory holds, pixel bombs, a folder
read at a huge first image's size, a folder that would not fit in memory. And JPEGs larger than
needed are decoded smaller by the decoder, giving what the full decode gives to within a few levels.

"Exceeds memory" is made cheap with DDPM_MEMORY_BYTES, which ddpm.resources reads as the memory.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ddpm.data.folder as folder
from ddpm.data import DataError, load_array, load_dataset, load_image_folder

HUGE_SHAPE = (2**38, 2)  # float32: 2 TiB declared
HUGE_BYTES = 2**38 * 2 * 4


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _refused(call, match: str) -> str:
    """The one-line DataError message of call(), which must match ``match``."""
    with pytest.raises(DataError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def no_np_load(monkeypatch):
    """np.load would allocate what the header declares; reaching it means the check came too late."""
    def refuse(*args, **kwargs):
        raise AssertionError("np.load was reached")
    monkeypatch.setattr(np, "load", refuse)


# ---------------------------------------------------------------------------------------------
# Arrays


def test_huge_npy_header_is_refused_before_allocating(tmp_path, no_np_load):
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy_header(HUGE_SHAPE) + bytes(64))
    message = _refused(lambda: load_array(path), "damaged or truncated")
    assert str(path) in message
    assert f"the header declares {HUGE_BYTES} bytes" in message and "the file holds 64" in message


def test_truncated_npy_is_refused(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((10, 3), np.float32))
    path.write_bytes(path.read_bytes()[:-7])  # a copy interrupted before the end
    message = _refused(lambda: load_dataset(path), "damaged or truncated")
    assert str(path) in message and "declares 120 bytes" in message and "the file holds 113" in message


def test_npz_members_are_checked_like_npy(tmp_path, no_np_load):
    path = tmp_path / "set.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("labels.npy", _npy_header((4,), "<i8") + bytes(32))
        archive.writestr("data.npy", _npy_header(HUGE_SHAPE) + bytes(64))
    message = _refused(lambda: load_array(path), "damaged or truncated")
    assert f"{path} (member data.npy)" in message and f"declares {HUGE_BYTES} bytes" in message


# ---------------------------------------------------------------------------------------------
# Image folders


@pytest.mark.parametrize("side, limit", [(12, 100), (20, 200)])  # Pillow's warning, then its error
def test_pixel_bomb_is_refused_naming_the_file(tmp_path, monkeypatch, side, limit):
    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")  # 64 pixels: fine
    Image.new("L", (side, side), 20).save(tmp_path / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    message = _refused(lambda: load_image_folder(tmp_path, image_size=8), "decompression bomb")
    assert str(tmp_path / "b.png") in message
    assert f"({side * side} pixels) exceeds limit of {limit} pixels" in message


def test_jpeg_larger_than_needed_is_decoded_smaller_and_close_to_the_full_decode(tmp_path, monkeypatch):
    y, x = np.mgrid[0:256, 0:320] / 255.0  # gradients and a texture of about 8 cycles across
    rgb = np.stack([x / 1.25, y, 0.5 + 0.4 * np.sin(40 * x) * np.cos(40 * y)], axis=-1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).save(path, quality=95)
    with Image.open(path) as image:  # the full decode, then the same resize and centre crop
        full = np.asarray(folder._resize_center_crop(image.convert("RGB"), 32)).astype(int)
    sizes = []  # the size of each decoded image, as it reaches the resize
    resize = folder._resize_center_crop
    monkeypatch.setattr(folder, "_resize_center_crop", lambda im, size: sizes.append(im.size) or resize(im, size))
    images = load_image_folder(tmp_path, image_size=32)
    assert sizes == [(80, 64)]  # decoded at 1/4 of 320x256 (no smaller than twice 32), not at full size
    assert images.resized == 1
    assert np.abs(images.images[0].astype(int) - full).max() <= 4


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height in its IHDR chunk and holds no pixels: Pillow opens it (the
    size is known) but cannot decode it, so the refusal must come from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_huge_first_image_without_image_size_is_refused_naming_image_size(tmp_path):
    _png_header_only(tmp_path / "huge.png", 8000, 8000)
    message = _refused(lambda: load_dataset(tmp_path), "--image-size")
    assert str(tmp_path / "huge.png") in message and "8000x8000" in message
    assert f"above {folder.MAX_OWN_SIZE}" in message and "first image's size unless told" in message


def test_dataset_exceeding_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_MEMORY_BYTES", "1000")
    np.save(tmp_path / "points.npy", np.zeros((10, 30), np.float32))  # 1200 bytes
    message = _refused(lambda: load_dataset(tmp_path / "points.npy"), "more than this machine's memory")
    assert str(tmp_path / "points.npy") in message and "fewer or smaller examples in the file" in message
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images / f"{i}.png")
    # 4 x 3 x 8 x 8 float32 = 3072 bytes
    message = _refused(lambda: load_dataset(images, image_size=8), "more than this machine's memory")
    assert str(images) in message and "--image-size or --num-examples" in message
    assert len(load_dataset(images, image_size=4, n=2)) == 2  # 2 x 3 x 4 x 4 x 4 = 384 bytes fits
