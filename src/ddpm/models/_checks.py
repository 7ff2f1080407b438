"""The input-shape check every model makes at call time (their config fields are checked at
construction by ddpm.validation)."""

from __future__ import annotations

import torch
from torch import Tensor


def check_input_shapes(x: Tensor, t: Tensor, sample_shape: tuple[int | None, ...], divisor: int = 1,
                       labels: Tensor | None = None, num_classes: int = 0) -> None:
    """Raise ValueError unless x is (B, *sample_shape), t is (B,), and labels None or (B,) integers
    given to a class-conditional network (num_classes > 0).

    None in ``sample_shape`` matches any size that is a multiple of ``divisor`` (a U-Net's spatial
    sizes). Only shapes are read, never values, so the check costs no device-to-host sync and
    compiles to guards under torch.compile.
    """
    expected = "(B, " + ", ".join("*" if s is None else str(s) for s in sample_shape) + ")"
    if x.ndim != 1 + len(sample_shape) or any(
        (size % divisor != 0) if want is None else (size != want) for size, want in zip(x.shape[1:], sample_shape)
    ):
        extra = f" with every * a multiple of {divisor}" if divisor > 1 and None in sample_shape else ""
        raise ValueError(f"x_t must have shape {expected}{extra}; got {tuple(x.shape)}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},); got {tuple(t.shape)}")
    if labels is not None:
        if num_classes == 0:
            raise ValueError("labels were given to an unconditional network (num_classes = 0); it takes none")
        if labels.shape != t.shape or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be integers of shape (B,) = ({x.shape[0]},), each in 0..{num_classes} "
                             f"({num_classes}: no class); got {labels.dtype} of shape {tuple(labels.shape)}")
