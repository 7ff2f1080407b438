"""The InceptionV3 network behind FID (Heusel et al. 2017, arXiv 1706.08500), in plain PyTorch.

FID compares the mean and covariance of "pool3" features: the 2048 channels of InceptionV3's final
average pool, computed with the 2015-12-05 TensorFlow ImageNet weights. Those weights are used here
in the PyTorch port published by pytorch-fid (mseitzer/pytorch-fid),
``pt_inception-2015-12-05-6726825d.pth``, so this module's parameter and buffer names and shapes
are exactly that file's: torchvision's ``Inception3`` layout (convolutions without bias, BatchNorm
with eps 0.001) with a 1008-way ``fc`` and no ``AuxLogits``. Nothing is downloaded here;
:func:`inception_weights_path` says where to get the file.

The TF graph those weights come from is not torchvision's InceptionV3 in two places that change the
features, and pytorch-fid reproduces both, as does this module:

- every 3x3 average pool inside a block (Mixed_5b-5d, 6b-6e, 7b) averages only the in-image
  neighbours (TF's SAME padding), i.e. ``count_include_pad=False``;
- the pool branch of the last block, Mixed_7c, takes a 3x3 *max* pool, not an average.

Features, as defined here (and as papers compute them through pytorch-fid):

1. ``images`` are float (B, C, H, W) in [-1, 1], C = 1 or 3; grayscale is repeated to 3 channels.
2. They are resized to 299x299 with bilinear interpolation, ``align_corners=False`` (PyTorch's
   ``F.interpolate``); a 299x299 input is passed through untouched, which is what that
   interpolation computes at scale 1 anyway.
3. The network runs up to the final average pool and returns (B, 2048) float32.

pytorch-fid takes images in [0, 1], resizes, then maps x -> 2x - 1. Bilinear weights sum to one, so
resizing commutes with that affine map, and feeding [-1, 1] images straight in gives the same
features up to float rounding. The original TF FID code differs from pytorch-fid (and so from this
module) in two small ways: it resized with TF's own bilinear resize, and its graph scaled 8-bit
values as (v - 128) / 128 rather than 2 v / 255 - 1. Numbers from this module therefore match
pytorch-fid, not the TF code bit for bit. Whether images are clipped or quantized to 8 bits first
(as when FID is computed from saved PNG files) is the caller's choice, and it moves the score.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.evaluation.metrics import in_batches

__all__ = [
    "InceptionWeightsError", "INCEPTION_WEIGHTS_ENV", "INCEPTION_WEIGHTS_FILENAME", "INCEPTION_WEIGHTS_URL",
    "INCEPTION_WEIGHTS_SHA256", "INCEPTION_INPUT_SIZE", "FEATURE_DIM", "FIDInceptionV3", "prepare_inception_input",
    "inception_weights_path", "load_inception", "inception_features",
]

INCEPTION_WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"
INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILENAME
)
# The file name follows torch.hub's convention: "6726825d" is the first 8 hex digits of the file's
# sha256. The full digest below is the one that several independent projects pin for this file
# (95,628,359 bytes), and it agrees with that prefix.
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

INCEPTION_INPUT_SIZE = 299
FEATURE_DIM = 2048
_NUM_CLASSES = 1008  # the 2015 TF graph's softmax layer; kept only so the published file loads

# torch.hub's convention: "<name>-<sha256 prefix>.<ext>". At least 8 hex digits, so that names such
# as "model-1.pth" do not count as carrying a checksum.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt)$")
_TORCH_SUFFIXES = (".pth", ".pt")
_MAX_KEYS_IN_MESSAGE = 3

PoolKind = Literal["avg", "max"]


class InceptionWeightsError(ValueError):
    """The Inception weights file is missing, unreadable, corrupt or for another network; one-line message."""


# --- the network ------------------------------------------------------------------------------------

class _ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001) -> ReLU; the attribute names ``conv``/``bn`` are the file's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_3x3_same(x: Tensor, kind: PoolKind) -> Tensor:
    """3x3, stride-1 pooling that keeps the size (B, C, H, W) -> (B, C, H, W), as TF's SAME padding does.

    TF's average ignores the padded positions, so border outputs are means over 4 or 6 pixels, not 9.
    """
    if kind == "avg":
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _BlockA(nn.Module):
    """35x35 block (Mixed_5b-5d): 1x1, 5x5, double 3x3 and pooled 1x1 branches, concatenated."""

    def __init__(self, in_channels: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(in_channels, pool_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, 224 + pool_channels, H, W)."""
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool_3x3_same(x, "avg"))
        return torch.cat([b1, b5, b3, bp], dim=1)


class _BlockB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a): strided 3x3, strided double 3x3, max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, 480 + in, (H-3)//2 + 1, (W-3)//2 + 1)."""
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class _BlockC(nn.Module):
    """17x17 block (Mixed_6b-6e): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, 768, H, W)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_pool_3x3_same(x, "avg"))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class _BlockD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a): strided 3x3, 7x7 then strided 3x3, max pool."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, 512 + in, (H-3)//2 + 1, (W-3)//2 + 1)."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class _BlockE(nn.Module):
    """8x8 block (Mixed_7b, 7c): 3x3 convolutions split into parallel 1x3 and 3x1 outputs.

    ``pool`` is "avg" for Mixed_7b and "max" for Mixed_7c: the TF graph behind the FID weights
    max-pools there (other InceptionV3 implementations average), and the features depend on it.
    """

    def __init__(self, in_channels: int, pool: PoolKind) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) -> (B, 2048, H, W)."""
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        bp = self.branch_pool(_pool_3x3_same(x, self.pool))
        return torch.cat([b1, b3, b3d, bp], dim=1)


def prepare_inception_input(images: Tensor) -> Tensor:
    """(B, C, H, W) images in [-1, 1], C = 1 or 3 -> (B, 3, 299, 299) float32, still in [-1, 1].

    Grayscale is repeated to three channels; other sizes are resized bilinearly with
    ``align_corners=False`` (pytorch-fid's resize). A 299x299 input comes back unchanged.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
        x = F.interpolate(x, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear",
                          align_corners=False)
    return x


class FIDInceptionV3(nn.Module):
    """InceptionV3 with the FID graph's block variants; ``forward`` returns pool3 features.

    Parameter and buffer names are those of pytorch-fid's weights file (torchvision's layout); the
    ``fc`` layer is there only for that file and is not used by ``forward``. The module always stays
    in eval mode: the features are defined by the file's BatchNorm running statistics, so a
    ``.train()`` from a parent module must not switch to batch statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        # Stem, in torchvision's registration order (the state dict's key order follows it).
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_channels=32)
        self.Mixed_5c = _BlockA(256, pool_channels=64)
        self.Mixed_5d = _BlockA(288, pool_channels=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, channels_7x7=128)
        self.Mixed_6c = _BlockC(768, channels_7x7=160)
        self.Mixed_6d = _BlockC(768, channels_7x7=160)
        self.Mixed_6e = _BlockC(768, channels_7x7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, pool="avg")
        self.Mixed_7c = _BlockE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, _NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Stays in eval mode whatever ``mode`` is (see the class docstring)."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1], C = 1 or 3, any size -> (B, 2048) float32 pool3 features."""
        x = prepare_inception_input(images).to(self.fc.weight.dtype)
        x = self.Conv2d_1a_3x3(x)                              # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)                              # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)                              # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)           # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)                              # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)                              # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)           # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d):
            x = block(x)                                       # (B, 256 / 288 / 288, 35, 35)
        x = self.Mixed_6a(x)                                   # (B, 768, 17, 17)
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)                                       # (B, 768, 17, 17)
        x = self.Mixed_7a(x)                                   # (B, 1280, 8, 8)
        x = self.Mixed_7b(x)                                   # (B, 2048, 8, 8)
        x = self.Mixed_7c(x)                                   # (B, 2048, 8, 8)
        # pool3; the same adaptive pool as torchvision / pytorch-fid, for the same float rounding.
        return F.adaptive_avg_pool2d(x, 1).flatten(1).float()  # (B, 2048)


# --- the weights file ---------------------------------------------------------------------------------

def _how_to_get() -> str:
    return (f"download it from {INCEPTION_WEIGHTS_URL}, then pass --inception-weights PATH "
            f"or set {INCEPTION_WEIGHTS_ENV}")


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The weights file to use: ``path`` if given, else ``$DDPM_INCEPTION_WEIGHTS``; it must exist."""
    if path is None or str(path) == "":
        path = os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if path is None:
        raise InceptionWeightsError(f"FID needs the InceptionV3 weights file {INCEPTION_WEIGHTS_FILENAME} "
                                    f"({_how_to_get()})")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise InceptionWeightsError(f"InceptionV3 weights file {resolved} not found; FID needs "
                                    f"{INCEPTION_WEIGHTS_FILENAME} ({_how_to_get()})")
    return resolved


def _expected_sha256(path: Path) -> str | None:
    """The sha256 (or its prefix) that a torch.hub-style name promises, or None if it promises nothing."""
    if path.suffix not in _TORCH_SUFFIXES:
        return None  # a converted .safetensors copy has other bytes, whatever it is called
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return None
    prefix = match.group(1)
    # The published file (under its own or another name, e.g. torch-fidelity's copy): check all 64 digits.
    return INCEPTION_WEIGHTS_SHA256 if INCEPTION_WEIGHTS_SHA256.startswith(prefix) else prefix


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _read_state_dict(path: Path) -> Mapping[Any, Any]:
    """The tensors stored in ``path``, read without running any pickled code."""
    data = path.read_bytes()  # hash and parse the same bytes, so the file cannot change in between
    expected = _expected_sha256(path)
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if not actual.startswith(expected):
            what = "sha256" if len(expected) == 64 else "sha256 prefix"
            raise InceptionWeightsError(f"InceptionV3 weights file {path} checksum does not match: expected "
                                        f"{what} {expected}, got {actual}; re-download it from "
                                        f"{INCEPTION_WEIGHTS_URL}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as err:  # safetensors raises several types for a damaged header
            raise InceptionWeightsError(f"cannot read {path} as a safetensors file: {_first_line(err)}") from err
    if path.suffix in _TORCH_SUFFIXES:
        try:
            # weights_only: the restricted unpickler accepts tensors and plain containers and
            # refuses anything else, so a crafted file cannot run code.
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError, EOFError, zip errors, ...
            raise InceptionWeightsError(f"cannot read {path} as PyTorch weights (only tensors are "
                                        f"accepted): {_first_line(err)}") from err
        if not isinstance(state, Mapping):
            raise InceptionWeightsError(f"{path} holds a {type(state).__name__}, not a state dict of "
                                        "InceptionV3 weights")
        return state
    raise InceptionWeightsError(f"InceptionV3 weights file {path} must end in .pth, .pt or .safetensors")


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return shown + (f" (and {more} more)" if more > 0 else "")


def _check_state_dict(state: Mapping[Any, Any], model: nn.Module, path: Path) -> dict[str, Tensor]:
    """``state`` as a dict of tensors, if it has exactly ``model``'s keys and shapes; else InceptionWeightsError.

    BatchNorm's ``num_batches_tracked`` counters may be absent: they play no part in eval mode,
    and files written before PyTorch 0.4 (or converted from TF) do not have them.
    """
    non_tensors = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if non_tensors:
        raise InceptionWeightsError(f"{path} is not a state dict of tensors: {_listing(non_tensors)}")
    tensors: dict[str, Tensor] = dict(state)
    expected = model.state_dict()
    unexpected = [k for k in tensors if k not in expected]
    missing = [k for k in expected if k not in tensors and not k.endswith(".num_batches_tracked")]
    if unexpected or missing:
        parts = ([f"unexpected keys {_listing(unexpected)}"] if unexpected else []) + (
            [f"missing keys {_listing(missing)}"] if missing else [])
        raise InceptionWeightsError(f"{path} is not the FID InceptionV3 weights file: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in tensors.items() if v.shape != expected[k].shape]
    if wrong:
        raise InceptionWeightsError(f"{path} has tensors of the wrong shape: {_listing(wrong)}")
    not_float = [k for k, v in tensors.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if not_float:
        raise InceptionWeightsError(f"{path} has non-float weights: {_listing(not_float)}")
    return tensors


def load_inception(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID InceptionV3 with weights from ``path`` (or ``$DDPM_INCEPTION_WEIGHTS``), frozen, in eval mode.

    ``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``, ``.safetensors`` with
    safetensors; a torch.hub-style name (``...-6726825d.pth``) has its sha256 checked first.
    Raises InceptionWeightsError with a one-line message for any file that is not the right one.
    """
    resolved = inception_weights_path(path)
    state = _read_state_dict(resolved)
    with torch.device("meta"):  # shapes only: a random initialisation would be overwritten anyway
        model = FIDInceptionV3()
    tensors = _check_state_dict(state, model, resolved)
    model = model.to_empty(device="cpu")
    # Keys and shapes are checked above, so the only tensors the file may leave unset are the
    # optional num_batches_tracked counters.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.num_batches_tracked is not None:
            module.num_batches_tracked.zero_()
    model.load_state_dict(tensors, strict=False)
    return model.to(device).requires_grad_(False).eval()


def inception_features(model: nn.Module, images: Tensor, batch_size: int = 50, progress: str | None = None) -> Tensor:
    """Pool3 features of ``images`` (N, C, H, W) in [-1, 1] -> (N, 2048) float32 on the CPU.

    Runs ``model`` (usually from :func:`load_inception`) in batches of ``batch_size`` on the
    model's device, under ``torch.inference_mode``. progress: a bar's label (None: no bar).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    return in_batches(model, images, batch_size, next(model.parameters()).device, FEATURE_DIM, progress)
