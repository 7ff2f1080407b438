"""Conversions into the package's image convention, and the training-time flip.

Stored images arrive as uint8 (N, H, W) or (N, H, W, C) arrays; the models want float32
(N, C, H, W) in [-1, 1]. Resizing and channel changes work on that float tensor, batched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.data._checks import require_channels, require_int
from ddpm.data.errors import DataError

__all__ = ["uint8_to_float", "convert_channels", "resize_center_crop", "random_hflip", "host_to_device"]

# ITU-R BT.601 luma weights: what Pillow's convert("L") uses, so arrays and image folders agree.
_LUMA = (0.299, 0.587, 0.114)
_RESIZE_CHUNK = 4096  # images per interpolate call, to bound the temporary memory


def uint8_to_float(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]: 0 -> -1, 255 -> 1."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"expected uint8 images (N, H, W) or (N, H, W, C); got {images.dtype} {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return tensor.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def convert_channels(images: Tensor, channels: int) -> Tensor:
    """(N, C, H, W) with C in {1, 3} -> (N, channels, H, W): RGB to gray by BT.601 luma, gray to RGB by repeat.

    The luma weights sum to one, so applying them in [-1, 1] space equals applying them in [0, 1].
    """
    require_channels(channels)
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3:
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
        return torch.einsum("nchw,c->nhw", images, weights)[:, None]
    raise DataError(f"images have {have} channels; only 1 (grayscale) or 3 (RGB) can be converted")


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, C, size, size): shorter side to ``size`` (antialiased bicubic),
    then the centre crop. Bicubic overshoots at edges, so the result is clamped back to [-1, 1]."""
    require_int("image_size", size)
    n, _, h, w = images.shape
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    chunks = []
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = images[start:start + _RESIZE_CHUNK]
        if (new_h, new_w) != (h, w):
            chunk = F.interpolate(chunk, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        chunks.append(chunk[:, :, top:top + size, left:left + size].clamp(-1.0, 1.0))
    return torch.cat(chunks) if chunks else images.new_empty(0, images.shape[1], size, size)


def random_hflip(batch: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image of (N, C, H, W) left-right with probability 1/2, drawn from ``generator``.

    A training-time augmentation: the dataset itself stays unflipped, so resuming by index is exact.
    Returns a new (N, C, H, W) tensor on batch's device.
    """
    if batch.ndim != 4:
        raise ValueError(f"random_hflip expects images (N, C, H, W); got shape {tuple(batch.shape)}")
    flip = torch.rand(batch.shape[0], generator=generator, device=generator.device) < 0.5
    flip = host_to_device(flip, batch.device)[:, None, None, None]
    return torch.where(flip, batch.flip(-1), batch)


def host_to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x.to(device)`` without making the host wait for the GPU's queued work.

    A copy from ordinary (pageable) host memory to a GPU waits until every kernel already queued has
    finished; from pinned memory with ``non_blocking`` it is queued like a kernel (PyTorch's pinned
    allocator keeps the source alive until the copy is done). So a training step that moves its
    batch indices this way never stalls. Elsewhere this is ``x.to(device)``.
    """
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
