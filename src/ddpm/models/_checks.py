"""The input-shape check every model makes at call time (their config fields are checked at
construction by ddpm.validation)."""

from __future__ import annotations

from torch import Tensor


def check_input_shapes(x: Tensor, t: Tensor, sample_shape: tuple[int | None, ...], divisor: int = 1) -> None:
    """Raise ValueError unless x is (B, *sample_shape) and t is (B,).

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
