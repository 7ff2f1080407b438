"""The FID InceptionV3: layout of the published weights file, safe loading, the FID block variants, the resize.

The real weights file cannot be downloaded here, so every test uses randomly initialised weights;
what ties the module to the published file is its exact key/shape listing, written out below from
torchvision's ``Inception3`` and pytorch-fid's FID blocks (mseitzer/pytorch-fid, inception.py).
One full forward pass costs about a second on two CPU cores, so forward passes are few and shared.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ddpm.evaluation.inception import (
    INCEPTION_WEIGHTS_ENV, INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_SHA256, INCEPTION_WEIGHTS_URL,
    FIDInceptionV3, InceptionWeightsError, inception_features, inception_weights_path, load_inception,
    prepare_inception_input,
)

# 27,161,264 is torchvision's inception_v3 (1000 classes, with AuxLogits; the "num_params" of its
# ImageNet weights). The FID network drops AuxLogits (conv0 768*128 + BN 2*128, conv1 128*768*5*5
# + BN 2*768, fc 768*1000 + 1000 = 3,326,696) and has 1008 classes (fc gains 8*2048 + 8 = 16,392).
FID_INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 16_392  # = 23,850,960

# --- the expected layout, written out independently of the module ------------------------------------


def _conv_units() -> list[tuple[str, int, int, int, int]]:
    """(name, out, in, kh, kw) of every conv+BN unit, in torchvision's registration order."""
    units = [("Conv2d_1a_3x3", 32, 3, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 64, 32, 3, 3),
             ("Conv2d_3b_1x1", 80, 64, 1, 1), ("Conv2d_4a_3x3", 192, 80, 3, 3)]

    def block(name: str, rows: list[tuple[str, int, int, int, int]]) -> None:
        units.extend((f"{name}.{branch}", out, cin, kh, kw) for branch, out, cin, kh, kw in rows)

    for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        block(name, [("branch1x1", 64, cin, 1, 1), ("branch5x5_1", 48, cin, 1, 1), ("branch5x5_2", 64, 48, 5, 5),
                     ("branch3x3dbl_1", 64, cin, 1, 1), ("branch3x3dbl_2", 96, 64, 3, 3),
                     ("branch3x3dbl_3", 96, 96, 3, 3), ("branch_pool", pool, cin, 1, 1)])
    block("Mixed_6a", [("branch3x3", 384, 288, 3, 3), ("branch3x3dbl_1", 64, 288, 1, 1),
                       ("branch3x3dbl_2", 96, 64, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)])
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block(name, [("branch1x1", 192, 768, 1, 1), ("branch7x7_1", c7, 768, 1, 1), ("branch7x7_2", c7, c7, 1, 7),
                     ("branch7x7_3", 192, c7, 7, 1), ("branch7x7dbl_1", c7, 768, 1, 1),
                     ("branch7x7dbl_2", c7, c7, 7, 1), ("branch7x7dbl_3", c7, c7, 1, 7),
                     ("branch7x7dbl_4", c7, c7, 7, 1), ("branch7x7dbl_5", 192, c7, 1, 7),
                     ("branch_pool", 192, 768, 1, 1)])
    block("Mixed_7a", [("branch3x3_1", 192, 768, 1, 1), ("branch3x3_2", 320, 192, 3, 3),
                       ("branch7x7x3_1", 192, 768, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                       ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)])
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        block(name, [("branch1x1", 320, cin, 1, 1), ("branch3x3_1", 384, cin, 1, 1),
                     ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
                     ("branch3x3dbl_1", 448, cin, 1, 1), ("branch3x3dbl_2", 384, 448, 3, 3),
                     ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
                     ("branch_pool", 192, cin, 1, 1)])
    return units


def _expected_layout() -> list[tuple[str, tuple[int, ...]]]:
    layout: list[tuple[str, tuple[int, ...]]] = []
    for name, out, cin, kh, kw in _conv_units():
        layout.append((f"{name}.conv.weight", (out, cin, kh, kw)))
        layout += [(f"{name}.bn.{buf}", (out,)) for buf in ("weight", "bias", "running_mean", "running_var")]
        layout.append((f"{name}.bn.num_batches_tracked", ()))
    return layout + [("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]


# --- shared models and files -----------------------------------------------------------------------


def _randomize(model: FIDInceptionV3, seed: int) -> FIDInceptionV3:
    """He-initialised convs and non-trivial BN statistics, so activations stay O(1) through ~50 layers
    and a loader that skipped any tensor (a running mean, say) would change the features."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-0.2, 0.2, generator=g)
            m.running_mean.normal_(0.0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.num_batches_tracked.fill_(1000)
    model.fc.weight.normal_(0.0, 0.02, generator=g)
    return model


@pytest.fixture(scope="module")
def source() -> FIDInceptionV3:
    return _randomize(FIDInceptionV3(), seed=0)


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def source_features(source: FIDInceptionV3, images: Tensor) -> Tensor:
    with torch.inference_mode():
        return source(images).clone()


def _cheap_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's keys and shapes with stride-0 zero tensors: a file of a few hundred KB, not 95 MB."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def cheap_state(source: FIDInceptionV3) -> dict[str, Tensor]:
    return _cheap_state(source)


def _save(state: object, path: Path) -> Path:
    torch.save(state, path)
    return path


# --- layout ------------------------------------------------------------------------------------------


def test_state_dict_matches_the_published_layout(source: FIDInceptionV3) -> None:
    layout = [(k, tuple(v.shape)) for k, v in source.state_dict().items()]
    assert layout == _expected_layout()
    shapes = dict(layout)
    assert len(shapes) == 566  # 94 conv+BN units * 6 + fc.weight + fc.bias
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch1x1.conv.weight"] == (64, 192, 1, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["Mixed_7c.branch3x3dbl_3a.bn.weight"] == (384,)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any("AuxLogits" in k or k.endswith("conv.bias") for k in shapes)
    assert sum(p.numel() for p in source.parameters()) == FID_INCEPTION_PARAMETERS == 23_850_960
    bns = [m for m in source.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 94 and all(m.eps == 1e-3 for m in bns)


def test_model_is_frozen_and_stays_in_eval_mode() -> None:
    model = FIDInceptionV3()
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not any(m.training for m in model.modules())


# --- features and loading round trip --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_gives_identical_weights_and_features(source: FIDInceptionV3, images: Tensor,
                                                         source_features: Tensor, tmp_path: Path,
                                                         suffix: str) -> None:
    state = source.state_dict()
    path = tmp_path / f"inception{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = load_inception(path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    if suffix == ".pth":  # one end-to-end pass is enough: equal tensors in the same module, equal output
        features = inception_features(model, images)
        assert features.shape == (2, 2048) and features.dtype == torch.float32 and features.device.type == "cpu"
        assert torch.equal(features, source_features)
        assert source_features.std() > 1e-2  # a non-degenerate random network, so equality means something


def test_grayscale_is_the_three_channel_repeat(source: FIDInceptionV3) -> None:
    gray = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(prepare_inception_input(gray), prepare_inception_input(gray.repeat(1, 3, 1, 1)))
    with torch.inference_mode():
        assert torch.equal(source(gray), source(gray.repeat(1, 3, 1, 1)))


def test_inception_features_batches(source: FIDInceptionV3, images: Tensor, source_features: Tensor) -> None:
    features = inception_features(source, images, batch_size=1)
    # Per-image batches may round differently inside the convolutions, not more.
    assert torch.allclose(features, source_features, rtol=1e-4, atol=1e-5)
    assert not features.is_inference() and not features.requires_grad
    assert inception_features(source, images[:0]).shape == (0, 2048)
    with pytest.raises(ValueError, match="batch_size"):
        inception_features(source, images, batch_size=0)


# --- where the weights come from -----------------------------------------------------------------


def test_weights_path_from_argument_or_environment(cheap_state: dict[str, Tensor], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(cheap_state, tmp_path / "w.pth")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    assert inception_weights_path() == path
    assert load_inception().fc.weight.abs().sum() == 0
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))
    assert inception_weights_path(path) == path  # an explicit path wins over the environment


def test_no_path_and_no_environment_says_how_to_get_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError) as info:
        load_inception()
    message = str(info.value)
    assert "\n" not in message
    for part in (INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_URL, INCEPTION_WEIGHTS_ENV, "--inception-weights"):
        assert part in message


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    for call in (lambda: load_inception(tmp_path / "absent.pth"), load_inception):
        with pytest.raises(InceptionWeightsError, match="not found.*" + INCEPTION_WEIGHTS_ENV):
            call()


# --- files that must be refused ----------------------------------------------------------------------


def test_missing_num_batches_tracked_is_accepted(cheap_state: dict[str, Tensor], tmp_path: Path) -> None:
    # Files written before PyTorch 0.4 or converted from TF have no such counters; eval mode ignores them.
    state = {k: v for k, v in cheap_state.items() if not k.endswith("num_batches_tracked")}
    model = load_inception(_save(state, tmp_path / "old.pth"))
    assert model.Mixed_7c.branch_pool.bn.num_batches_tracked.item() == 0


@pytest.mark.parametrize("change, expected", [
    ("rename", "unexpected keys Mixed_5b.branch1x1.kernel.weight; missing keys Mixed_5b.branch1x1.conv.weight"),
    ("extra", "unexpected keys AuxLogits.fc.weight"),
    ("drop", "missing keys fc.bias"),
    ("shape", r"fc.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"),
    ("dtype", "non-float weights: fc.bias"),
    ("nested", "not a state dict of tensors: state_dict"),
    ("not_tensor", "not a state dict of tensors: fc.bias"),
    ("list", "holds a list, not a state dict"),
])
def test_wrong_contents_are_refused(cheap_state: dict[str, Tensor], tmp_path: Path, change: str,
                                    expected: str) -> None:
    state: object = dict(cheap_state)
    assert isinstance(state, dict)
    if change == "rename":
        state["Mixed_5b.branch1x1.kernel.weight"] = state.pop("Mixed_5b.branch1x1.conv.weight")
    elif change == "extra":
        state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    elif change == "drop":
        del state["fc.bias"]
    elif change == "shape":
        state["fc.weight"] = torch.zeros(1000, 2048)
    elif change == "dtype":
        state["fc.bias"] = torch.zeros(1008, dtype=torch.long)
    elif change == "nested":
        state = {"state_dict": state}
    elif change == "not_tensor":
        state["fc.bias"] = [0.0] * 1008
    else:
        state = list(state.values())
    with pytest.raises(InceptionWeightsError, match=expected) as info:
        load_inception(_save(state, tmp_path / "bad.pth"))
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


def test_checksum_in_the_published_name_is_checked(cheap_state: dict[str, Tensor], tmp_path: Path) -> None:
    path = _save(cheap_state, tmp_path / INCEPTION_WEIGHTS_FILENAME)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InceptionWeightsError, match="checksum does not match") as info:
        load_inception(path)
    message = str(info.value)
    assert INCEPTION_WEIGHTS_SHA256 in message and actual in message and "re-download" in message
    assert "\n" not in message


def test_torch_hub_style_checksum_name(cheap_state: dict[str, Tensor], tmp_path: Path) -> None:
    path = _save(cheap_state, tmp_path / "w.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    good = path.rename(tmp_path / f"inception-{digest[:8]}.pth")
    load_inception(good)
    wrong_prefix = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = good.rename(tmp_path / f"inception-{wrong_prefix}.pth")
    with pytest.raises(InceptionWeightsError, match=f"expected sha256 prefix {wrong_prefix}, got {digest}"):
        load_inception(bad)


class _CreatesMarker:
    """Unpickling this object opens (creates) ``marker``: code execution, if the loader allowed it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_crafted_pickle_is_not_executed(cheap_state: dict[str, Tensor], tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    state = {**cheap_state, "fc.bias": _CreatesMarker(marker)}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    assert not marker.exists()
    with pytest.raises(InceptionWeightsError, match="only tensors are accepted") as info:
        load_inception(path)
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(InceptionWeightsError, match="cannot read .* as a safetensors file"):
        load_inception(broken)
    truncated = tmp_path / "truncated.pth"
    buffer = io.BytesIO()
    torch.save({"fc.bias": torch.zeros(1008)}, buffer)
    truncated.write_bytes(buffer.getvalue()[:100])
    with pytest.raises(InceptionWeightsError, match="cannot read .* as PyTorch weights"):
        load_inception(truncated)
    other = tmp_path / "inception.npz"
    other.write_bytes(b"")
    with pytest.raises(InceptionWeightsError, match=r"must end in \.pth, \.pt or \.safetensors"):
        load_inception(other)


# --- the FID-specific pooling, checked by behaviour -----------------------------------------------


def _pool_by_hand(x: Tensor, kind: str, stride: int, pad: int) -> Tensor:
    """3x3 pooling written out window by window; "avg_valid" averages only the in-image pixels
    (TF's SAME padding), "avg_with_pad" counts padded zeros too (PyTorch's default)."""
    _, _, h, w = x.shape
    rows = range(-pad, h + pad - 2, stride)
    cols = range(-pad, w + pad - 2, stride)
    out = torch.empty(x.shape[0], x.shape[1], len(rows), len(cols))
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            window = x[:, :, max(top, 0):top + 3, max(left, 0):left + 3]
            if kind == "max":
                out[:, :, i, j] = window.amax(dim=(2, 3))
            elif kind == "avg_valid":
                out[:, :, i, j] = window.mean(dim=(2, 3))
            else:
                out[:, :, i, j] = window.sum(dim=(2, 3)) / 9
    return out


@pytest.mark.parametrize("block, kind", [
    ("Mixed_5b", "avg_valid"), ("Mixed_5c", "avg_valid"), ("Mixed_5d", "avg_valid"), ("Mixed_6b", "avg_valid"),
    ("Mixed_6c", "avg_valid"), ("Mixed_6d", "avg_valid"), ("Mixed_6e", "avg_valid"), ("Mixed_7b", "avg_valid"),
    ("Mixed_7c", "max"),
])
def test_pool_branch_uses_the_fid_pooling(source: FIDInceptionV3, block: str, kind: str) -> None:
    module = getattr(source, block)
    in_channels = module.branch_pool.conv.in_channels
    pool_channels = module.branch_pool.conv.out_channels
    # A constant offset makes border windows (4 or 6 pixels) differ clearly between the pooling rules.
    x = torch.rand(1, in_channels, 5, 5, generator=torch.Generator().manual_seed(3)) + 2.0
    with torch.inference_mode():
        pool_branch = module(x)[:, -pool_channels:]  # the pool branch is concatenated last
        for candidate in ("avg_valid", "avg_with_pad", "max"):
            expected = module.branch_pool(_pool_by_hand(x, candidate, stride=1, pad=1))
            assert torch.allclose(pool_branch, expected, atol=1e-5) == (candidate == kind), candidate


@pytest.mark.parametrize("block", ["Mixed_6a", "Mixed_7a"])
def test_grid_reductions_max_pool_without_padding(source: FIDInceptionV3, block: str) -> None:
    module = getattr(source, block)
    in_channels = 288 if block == "Mixed_6a" else 768
    x = torch.rand(1, in_channels, 7, 7, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = module(x)
    assert out.shape[-2:] == (3, 3)
    assert torch.equal(out[:, -in_channels:], _pool_by_hand(x, "max", stride=2, pad=0))


# --- input preparation -------------------------------------------------------------------------------


def test_299_input_is_passed_through_unchanged() -> None:
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert torch.equal(prepare_inception_input(x), x)
    # pytorch-fid always interpolates; at scale 1 that is the identity, so skipping it changes nothing.
    assert torch.equal(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False), x)


def test_small_input_is_resized_bilinearly() -> None:
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(6)) * 2 - 1
    prepared = prepare_inception_input(x)
    assert prepared.shape == (2, 3, 299, 299) and prepared.dtype == torch.float32
    expected = F.interpolate(x.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.equal(prepared, expected)
    # pytorch-fid resizes [0, 1] images and then maps them to [-1, 1]; the order does not matter
    # beyond float rounding, because bilinear weights sum to one.
    unit = (x.repeat(1, 3, 1, 1) + 1) / 2
    pytorch_fid = 2 * F.interpolate(unit, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.allclose(prepared, pytorch_fid, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 2, 32, 32), (2, 4, 32, 32)])
def test_bad_image_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="C = 1 or 3"):
        prepare_inception_input(torch.zeros(shape))
