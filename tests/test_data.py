"""Tests of ddpm.data: generated sets, MNIST IDX files, CIFAR-10 pickles, checked downloads,
image folders, numpy arrays and the load_dataset entry point.

MNIST is the real database in ../shared/data/mnist (decoded once per module). CIFAR-10 and image
folders are written by the tests in the real formats. No test touches the network: every test runs
with urlopen replaced by one that fails, unless it installs its own fake.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.data.download as download
from ddpm.data import (
    DATASETS, ChecksumError, DataError, DownloadError, RestrictedUnpickler, convert_channels, default_cache_dir,
    download_file, eight_gaussians_centres, list_datasets, load_array, load_cifar10, load_dataset,
    load_image_folder, load_mnist, make_8gaussians, make_checkerboard, make_gradients, make_moons,
    make_square, make_swissroll, md5_of, nearest_gradient_distance, random_hflip, read_idx,
    resolve_data_path, uint8_to_float, verify_md5,
)
from ddpm.data.mnist import MNIST_MD5

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
MNIST_FILE_NAMES = sorted(MNIST_MD5)
# Published label counts (../shared/data/README.md).
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
POINT_SETS = {"moons": make_moons, "swissroll": make_swissroll, "8gaussians": make_8gaussians,
              "checkerboard": make_checkerboard}



@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Make every download fail as if offline, so no test can reach the network by accident."""
    def refuse(url, timeout=None):
        raise URLError("offline (tests never download)")
    monkeypatch.setattr(download, "urlopen", refuse)


@pytest.fixture(scope="module")
def mnist_test():
    return load_mnist(MNIST_DIR, "test")


# ---------------------------------------------------------------------------------------------
# Generated sets


def test_square_is_the_tutorial_target():
    x = make_square()
    assert x.shape == (1, 1, 8, 8) and x.dtype == torch.float32
    expected = -torch.ones(8, 8)
    expected[2:6, 2:6] = 1
    assert torch.equal(x[0, 0], expected)
    rgb = make_square(3, channels=3)
    assert rgb.shape == (3, 3, 8, 8) and torch.equal(rgb[2, 1], expected)
    assert make_square(image_size=16)[0, 0, 4:12, 4:12].eq(1).all()
    assert make_square(image_size=16).eq(1).sum() == 64


def test_gradients_shape_range_and_determinism():
    x = make_gradients(64, seed=3)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, make_gradients(64, seed=3))
    assert not torch.equal(x, make_gradients(64, seed=4))
    assert make_gradients(2, image_size=32, channels=1).shape == (2, 1, 32, 32)


def test_gradients_blend_two_colours_between_opposite_corners():
    x = make_gradients(32, seed=1).double()
    corners = torch.stack([x[..., 0, 0], x[..., 0, -1], x[..., -1, 0], x[..., -1, -1]], dim=-1)  # (N, C, 4)
    # Affine in (x, y): every channel's extremes sit at corners.
    assert torch.allclose(x.amax(dim=(2, 3)), corners.amax(-1), atol=1e-6)
    assert torch.allclose(x.amin(dim=(2, 3)), corners.amin(-1), atol=1e-6)
    # Two colours: every pixel is c0 + s (c1 - c0) with one s in [0, 1] shared by all channels.
    c0, c1 = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))
    span = (c1 - c0).argmax(dim=1)  # the channel that varies most gives s best
    for i in range(len(x)):
        k = span[i]
        s = (x[i, k] - c0[i, k]) / (c1[i, k] - c0[i, k])
        assert s.min().abs() < 1e-6 and (s.max() - 1).abs() < 1e-6
        start = x[i, :, :, :][:, s == 0][:, 0]
        end = x[i, :, :, :][:, s == 1][:, 0]
        assert torch.allclose(x[i], start[:, None, None] + s * (end - start)[:, None, None], atol=1e-6)


def test_nearest_gradient_distance():
    g = make_gradients(8, seed=0)
    assert nearest_gradient_distance(g).max() < 1e-5
    # A +-1 checkerboard on even sizes is orthogonal to 1, x and y: its whole RMS (1) is residual.
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1).float()
    assert torch.allclose(nearest_gradient_distance(g + 0.1 * checker), torch.full((8,), 0.1), atol=1e-5)
    noise = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert nearest_gradient_distance(noise).min() > 0.5
    with pytest.raises(ValueError, match="H, W >= 2"):
        nearest_gradient_distance(torch.zeros(2, 3, 1, 8))


@pytest.mark.parametrize("name", list(POINT_SETS))
def test_point_sets_are_deterministic_and_about_unit_variance(name):
    make = POINT_SETS[name]
    x = make(20_000, seed=5)
    assert x.shape == (20_000, 2) and x.dtype == torch.float32
    assert torch.equal(x, make(20_000, seed=5)) and not torch.equal(x, make(20_000, seed=6))
    assert x.mean(dim=0).abs().max() < 0.05
    assert abs(float(x.var(dim=0).mean()) - 1) < 0.05
    assert x.var(dim=0).min() > 0.4  # no axis collapsed


def test_moons_lie_on_their_half_circles():
    p = make_moons(2000, seed=0, noise=0.0).double()
    scale = math.sqrt((0.75 + (9 / 16 - 1 / math.pi)) / 2)
    x, y = p[:, 0] * scale + 0.5, p[:, 1] * scale + 0.25
    upper = ((x**2 + y**2).sqrt() - 1).abs() < 1e-5
    lower = (((x - 1) ** 2 + (y - 0.5) ** 2).sqrt() - 1).abs() < 1e-5
    assert (upper | lower).all()
    assert (y[upper] >= -1e-6).all() and (y[lower] <= 0.5 + 1e-6).all()
    assert 0.4 < upper.double().mean() < 0.6


def test_swissroll_follows_its_spiral():
    p = make_swissroll(2000, seed=0, noise=0.0).double()
    scale = math.sqrt((9.75 * math.pi**2 - 4 - (2 / (3 * math.pi)) ** 2) / 2)
    x, y = p[:, 0] * scale + 2, p[:, 1] * scale + 2 / (3 * math.pi)
    t = (x**2 + y**2).sqrt()
    assert t.min() >= 1.5 * math.pi - 1e-4 and t.max() <= 4.5 * math.pi + 1e-4
    assert torch.allclose(torch.cos(t) * t, x, atol=1e-4) and torch.allclose(torch.sin(t) * t, y, atol=1e-4)


def test_8gaussians_modes():
    centres = eight_gaussians_centres()
    assert torch.allclose(centres.norm(dim=1), torch.full((8,), math.sqrt(2)))
    p = make_8gaussians(8000, seed=0)
    distance, nearest = torch.cdist(p, centres).min(dim=1)
    assert distance.max() < 0.6  # 6 stds
    assert torch.bincount(nearest, minlength=8).min() > 800


def test_checkerboard_points_are_on_dark_cells():
    p = make_checkerboard(5000, seed=0) / (math.sqrt(3) / 2)
    assert p.abs().max() <= 2
    cells = (p + 2).floor().clamp(0, 3).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


@pytest.mark.parametrize("call", [
    lambda: make_moons(0), lambda: make_gradients(4, channels=2), lambda: make_square(image_size=3),
    lambda: make_8gaussians(10, std=-1.0), lambda: make_swissroll(2.5),
])
def test_generators_reject_bad_arguments(call):
    with pytest.raises(DataError):
        call()


# ---------------------------------------------------------------------------------------------
# MNIST and IDX files


def test_load_mnist_real_files(mnist_test):
    train = load_mnist(MNIST_DIR, "train")  # the only full decode of the training set
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert np.bincount(train.labels).tolist() == TRAIN_LABEL_COUNTS
    assert mnist_test.images.shape == (10000, 28, 28)
    assert np.bincount(mnist_test.labels).tolist() == TEST_LABEL_COUNTS
    assert mnist_test.labels.dtype == np.int64
    assert mnist_test.images.max() == 255 and mnist_test.images.min() == 0


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", a, compress=compress)
    assert np.array_equal(read_idx(tmp_path / "a", magic=2051), a)
    b = np.arange(6, dtype=np.int32).reshape(6) - 3
    _write_idx(tmp_path / "b", b, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "b"), b) and read_idx(tmp_path / "b").dtype == np.int32


def test_truncated_idx_names_file_expected_and_found(tmp_path):
    raw = gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(raw[:5000]))
    with pytest.raises(DataError) as err:
        read_idx(path, magic=2049)
    message = str(err.value)
    assert str(path) in message and "truncated" in message
    assert "10008" in message and "5000" in message  # 8-byte header + 10000 labels; what was there


def test_cut_gzip_stream_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()[:2000])
    with pytest.raises(DataError, match="not a complete gzip file"):
        read_idx(path)


def test_idx_magic_and_count_checks(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros(5, np.uint8))  # a labels file, wrongly named
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        load_mnist(tmp_path, "test")
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(DataError, match="5 labels but .* 4 images"):
        load_mnist(tmp_path, "test")
    (tmp_path / "junk").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="not a valid IDX header"):
        read_idx(tmp_path / "junk")


def test_mnist_unpacked_and_dotted_names(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images.idx3-ubyte", images)  # the dotted name some mirrors use
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 3], np.uint8))
    loaded = load_mnist(tmp_path, "test")
    assert np.array_equal(loaded.images, images) and loaded.labels.tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="no MNIST train files"):
        load_mnist(tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickles


def _fake_batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    """A batch in the published layout: protocol-2 dict of bytes keys, planar RGB rows of 3072 bytes."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {b"batch_label": b"fake batch", b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return pickle.dumps(batch, protocol=2), data, labels


def _write_cifar(root: Path, n: int = 3) -> tuple[Path, np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_data, all_labels = [], []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        raw, data, labels = _fake_batch(n, seed=i)
        if i == 0:  # the published files name numpy's old module; accept both spellings
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(raw)
        if name != "test_batch":
            all_data.append(data)
            all_labels += labels
    return folder, np.concatenate(all_data), all_labels


def test_load_cifar10_folder_and_archive(tmp_path):
    folder, data, labels = _write_cifar(tmp_path / "extracted")
    train = load_cifar10(tmp_path / "extracted", "train")
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.tolist() == labels
    # Planar rows: red plane, then green, then blue, each 32x32 row-major.
    assert np.array_equal(train.images[4, :, :, 0].ravel(), data[4, :1024])
    assert np.array_equal(train.images[4, :, :, 2].ravel(), data[4, 2048:])
    assert load_cifar10(folder, "test").images.shape == (3, 32, 32, 3)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_archive = load_cifar10(archive, "train")
    assert np.array_equal(from_archive.images, train.images)
    assert np.array_equal(from_archive.labels, train.labels)
    # As a dataset, with its class names (batches.meta's order), for conditional runs.
    dataset = load_dataset(tmp_path / "extracted")
    assert dataset.labels.tolist() == labels and dataset.classes[0] == "airplane" and dataset.classes[9] == "truck"


class _Exploit:
    """Unpickling this would run a shell command (here: create a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    folder, _, _ = _write_cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=2))
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path, "test")
    assert "refused to load" in str(err.value) and "system" in str(err.value)
    assert "test_batch" in str(err.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(_Exploit(marker))), encoding="bytes").load()
    assert not marker.exists()


def test_cifar_batch_with_wrong_contents(tmp_path):
    folder, _, _ = _write_cifar(tmp_path)
    wrong = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(wrong, protocol=2))
    with pytest.raises(DataError, match=r"uint8 array of shape \(N, 3072\)"):
        load_cifar10(tmp_path, "test")
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(tmp_path, "test")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_cifar10(tmp_path, "train")


# ---------------------------------------------------------------------------------------------
# Checksums, downloads and resolution


def test_md5_of_real_files_and_corrupt_copy(tmp_path):
    for name in MNIST_FILE_NAMES:
        verify_md5(MNIST_DIR / name, MNIST_MD5[name])
    copy = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray((MNIST_DIR / copy.name).read_bytes())
    raw[100] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=f"checksum mismatch for {copy}"):
        verify_md5(copy, MNIST_MD5[copy.name])
    assert md5_of(copy) == hashlib.md5(raw).hexdigest()


class _FakeResponse(io.BytesIO):
    """What urlopen returns, enough for download_file: a readable context manager with headers."""

    headers: dict[str, str] = {}  # no Content-Length: the download's bar counts bytes without a total


def test_download_writes_only_verified_files(tmp_path, monkeypatch):
    payload = b"some dataset bytes" * 1000
    good = hashlib.md5(payload).hexdigest()
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        if "down" in url:
            raise URLError("mirror down")
        return _FakeResponse(payload)

    monkeypatch.setattr(download, "urlopen", fake_urlopen)
    target = tmp_path / "cache" / "file.gz"
    assert download_file(["https://down.example/file.gz", "https://up.example/file.gz"], target, good) == target
    assert target.read_bytes() == payload and len(calls) == 2
    target.unlink()
    with pytest.raises(ChecksumError, match="checksum mismatch for https://up.example/file.gz"):
        download_file(["https://up.example/file.gz"], target, "0" * 32)
    assert list(target.parent.iterdir()) == []  # neither the file nor a temporary one is left
    # A cache folder that cannot be written is said to be that, before any mirror is asked.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DownloadError, match="cannot write the download to .*a-file.*DDPM_DATA"):
        download_file(["https://up.example/file.gz"], tmp_path / "a-file" / "file.gz", good)
    assert len(calls) == 3


def test_resolve_finds_local_and_cached_files(tmp_path):
    if MNIST_DIR.is_dir():
        assert resolve_data_path("mnist", data_dir=MNIST_DIR) == MNIST_DIR
    cache = tmp_path / "cache"
    (cache / "mnist").mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (cache / "mnist" / stem).write_bytes(b"")  # found by name; read later
    assert resolve_data_path("mnist", cache_dir=cache, split="test") == cache / "mnist"
    with pytest.raises(DataError, match=f"no mnist files in {tmp_path}"):
        resolve_data_path("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("name, files", [
    ("mnist", MNIST_FILE_NAMES), ("cifar10", ["cifar-10-python.tar.gz"]),
])
def test_offline_message_says_which_files_go_where(tmp_path, monkeypatch, name, files):
    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "data"
    with pytest.raises(DataError) as err:
        load_dataset(name)
    message = str(err.value)
    assert "\n" not in message and "could not download" in message
    assert str(tmp_path / "data" / name) in message
    assert all(f in message for f in files)


# ---------------------------------------------------------------------------------------------
# Image folders


def _save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def test_image_folder_reads_sorts_and_skips(tmp_path):
    _save(tmp_path / "b.png", Image.new("RGB", (40, 30), (255, 0, 0)))
    _save(tmp_path / "a.jpg", Image.new("L", (20, 20), 200), quality=95)
    _save(tmp_path / "sub" / "c.webp", Image.new("RGB", (16, 16), (0, 0, 255)), lossless=True)
    (tmp_path / "bad.png").write_bytes(b"certainly not a png")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(good, "PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[:60])
    (tmp_path / "notes.txt").write_text("ignored")
    folder = load_image_folder(tmp_path, image_size=16, channels=3)
    assert [p.name for p in folder.files] == ["a.jpg", "b.png", "c.webp"]
    assert [p.name for p in folder.skipped] == ["bad.png", "trunc.png"] and folder.total == 5
    assert folder.images.shape == (3, 16, 16, 3) and folder.images.dtype == np.uint8
    assert np.abs(folder.images[0].astype(int) - 200).max() <= 2  # gray repeated to RGB
    assert (folder.images[1] == [255, 0, 0]).all() and (folder.images[2] == [0, 0, 255]).all()
    data = load_dataset(tmp_path, image_size=8, channels=1)
    assert data.data.shape == (3, 1, 8, 8) and data.kind == "image"
    assert data.notes == ("skipped 2 of 5 files that Pillow could not read: bad.png, trunc.png",
                          "converted 2 of 3 images to gray (data.channels, --channels)",
                          "resized and centre-cropped 3 of 3 images to 8x8 (data.image_size, --image-size)")
    assert len(data.skipped) == 2
    assert load_dataset(tmp_path, image_size=16, channels=3).notes[1:] == (
        "converted 1 of 3 images to colour (data.channels, --channels)",
        "resized and centre-cropped 2 of 3 images to 16x16 (data.image_size, --image-size)")


def test_image_folder_resizes_shorter_side_then_centre_crops(tmp_path):
    stripes = np.zeros((20, 40, 3), np.uint8)  # 40 wide: red | green (middle half) | blue
    stripes[:, :10] = (255, 0, 0)
    stripes[:, 10:30] = (0, 255, 0)
    stripes[:, 30:] = (0, 0, 255)
    _save(tmp_path / "wide.png", Image.fromarray(stripes))
    image = load_image_folder(tmp_path, image_size=10).images[0]  # 40x20 -> 20x10 -> centre 10x10
    assert image.shape == (10, 10, 3)
    assert (image[:, 2:8, 1] == 255).all() and image[:, 2:8, [0, 2]].max() == 0


def test_image_folder_defaults_modes_and_transparency(tmp_path):
    _save(tmp_path / "g.png", Image.new("L", (12, 12), 100))
    _save(tmp_path / "h.png", Image.fromarray(np.full((12, 12), 65535, np.uint16)))  # 16-bit gray
    folder = load_image_folder(tmp_path)  # size and channels from the first image
    assert folder.images.shape == (2, 12, 12, 1)
    assert (folder.resized, folder.converted) == (0, 0) and load_dataset(tmp_path).notes == ()
    assert (folder.images[1] == 255).all()  # scaled from 16 bits, not clipped garbage
    clear = tmp_path / "rgba"
    _save(clear / "t.png", Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    assert (load_image_folder(clear, channels=3).images == 255).all()  # transparent -> white


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path, image_size=8)
    (tmp_path / "x.png").write_bytes(b"junk")
    (tmp_path / "y.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 2 image files"):
        load_dataset(tmp_path, image_size=8)
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "missing")


def test_random_hflip():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5).repeat(50, 1, 1, 1)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(dim=1)
    kept = (out == x).flatten(1).all(dim=1)
    assert (flipped ^ kept).all()  # every image is either unchanged or exactly mirrored
    assert 30 < int(flipped.sum()) < 70
    assert torch.equal(out, random_hflip(x, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------
# Arrays, conversions and load_dataset


def test_arrays_points_and_images(tmp_path):
    points = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "p.npy", points)
    d = load_dataset(tmp_path / "p.npy")
    assert d.kind == "points" and d.data.dtype == torch.float32
    assert torch.allclose(d.data.double(), torch.from_numpy(points), atol=1e-6)
    gray = np.array([[[0, 255], [128, 64]]], np.uint8).repeat(4, axis=0)
    np.save(tmp_path / "g.npy", gray)
    g = load_dataset(tmp_path / "g.npy")
    assert g.data.shape == (4, 1, 2, 2) and g.data[0, 0, 0].tolist() == [-1.0, 1.0]
    rgb = np.random.default_rng(1).random((6, 5, 5, 3))
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=np.arange(6))
    r = load_dataset(tmp_path / "rgb.npz", n=4, seed=1)
    assert r.data.shape == (4, 3, 5, 5) and r.labels.dtype == torch.int64
    index = r.labels.numpy()
    assert np.allclose(r.data.numpy(), rgb[index].transpose(0, 3, 1, 2) * 2 - 1, atol=1e-6)


@pytest.mark.parametrize("array, match", [
    (np.array([{"a": 1}, None], dtype=object), "without pickle"),
    (np.zeros((2, 4, 4, 5), np.uint8), r"C 1 or 3"),
    (np.full((2, 4, 4), 2.0), r"must lie in \[0, 1\]"),
    (np.zeros((2, 4, 4), np.int64), "uint8"),
    (np.zeros(5), r"expected points \(N, D\)"),
])
def test_arrays_reject_what_they_cannot_convert(tmp_path, array, match):
    np.save(tmp_path / "a.npy", array, allow_pickle=True)
    with pytest.raises(DataError, match=match):
        load_dataset(tmp_path / "a.npy")


def test_npz_needs_a_known_key(tmp_path):
    np.savez(tmp_path / "two.npz", first=np.zeros((2, 2)), second=np.zeros((2, 2)))
    with pytest.raises(DataError, match="name the data one of"):
        load_array(tmp_path / "two.npz")


def test_channel_conversion_uses_bt601_luma():
    rgb = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])[:, :, None, None]
    gray = convert_channels(rgb, 1)
    assert torch.allclose(gray.flatten(), torch.tensor([0.299, 0.587, 0.114]) * 2 - 1)
    assert torch.equal(convert_channels(gray, 3), gray.expand(-1, 3, -1, -1))
    assert torch.equal(uint8_to_float(np.array([[[0, 255]]], np.uint8)), torch.tensor([[[[-1.0, 1.0]]]]))


def test_builtin_names():
    assert set(list_datasets()) == set(DATASETS) == {
        "square", "gradients", "moons", "swissroll", "8gaussians", "checkerboard", "mnist", "cifar10"}
    for name in ("moons", "swissroll", "8gaussians", "checkerboard"):
        d = load_dataset(name, n=100)
        assert d.kind == "points" and d.data.shape == (100, 2) and d.name == name and len(d) == 100
    assert load_dataset("square").data.shape == (1, 1, 8, 8)
    assert load_dataset("gradients", n=5, image_size=8, channels=1).sample_shape == (1, 8, 8)
    train, test = load_dataset("moons", n=50), load_dataset("moons", n=50, split="test")
    assert not torch.equal(train.data, test.data)


def test_load_dataset_mnist_by_name_and_path():
    d = load_dataset("mnist", data_dir=MNIST_DIR, split="test", n=200, seed=1)
    assert d.data.shape == (200, 1, 28, 28) and d.kind == "image" and d.name == "mnist"
    assert d.data.min() == -1 and d.data.max() == 1 and d.labels.shape == (200,)
    again = load_dataset(MNIST_DIR, split="test", n=200, seed=1)  # detected by its files
    assert torch.equal(d.data, again.data) and torch.equal(d.labels, again.labels)
    big = load_dataset(MNIST_DIR, split="test", n=8, image_size=32, channels=3)
    assert big.data.shape == (8, 3, 32, 32) and big.data.abs().max() <= 1
    assert torch.equal(big.data[:, 0], big.data[:, 2])
    assert len(big.notes) == 2


def test_load_dataset_cifar_folder(tmp_path):
    _write_cifar(tmp_path)
    d = load_dataset(tmp_path, split="test", channels=1)
    assert d.name == "cifar10" and d.data.shape == (3, 1, 32, 32) and d.labels.shape == (3,)


@pytest.mark.parametrize("call, match", [
    (lambda p: load_dataset("celeba"), "unknown dataset 'celeba': not one of square, gradients, moons"),
    (lambda p: load_dataset("moons", image_size=8), "set of points"),
    (lambda p: load_dataset("moons", split="val"), "choose 'train' or 'test'"),
    (lambda p: load_dataset("square", n=0), "n = 0 is not allowed; use an integer >= 1 or None"),
    (lambda p: load_dataset(p / "g.npy", channels=2), "choose 1 .grayscale., 3 .RGB. or None"),
    (lambda p: load_dataset("gradients", image_size=0), "image_size = 0 is not allowed"),
    (lambda p: load_dataset(p / "file.csv"), "not a dataset this loader reads"),
    (lambda p: load_dataset(p, split="test"), "has no splits"),
    (lambda p: load_dataset(p / "g.npy", n=10), "more than the 4 items"),
])
def test_load_dataset_errors_are_one_line_value_errors(tmp_path, call, match):
    (tmp_path / "file.csv").write_text("1,2\n")
    np.save(tmp_path / "g.npy", np.zeros((4, 2)))
    with pytest.raises(ValueError, match=match) as err:
        call(tmp_path)
    assert isinstance(err.value, DataError) and "\n" not in str(err.value)


def test_mnist_copy_in_cache_is_used_without_download(tmp_path):
    cache = tmp_path / "cache"
    (cache / "mnist").mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(MNIST_DIR / stem, cache / "mnist" / stem)
    d = load_dataset("mnist", cache_dir=cache, split="test", n=10)
    assert d.data.shape == (10, 1, 28, 28)
