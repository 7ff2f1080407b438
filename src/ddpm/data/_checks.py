"""Argument checks shared by the data loaders, each raising DataError with a one-line message."""

from __future__ import annotations

from typing import Any

from ddpm.data.errors import DataError


def require_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> None:
    """Raise DataError unless value is an int >= minimum (or None, when optional). bool is refused."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        alternative = " or None" if optional else ""
        raise DataError(f"{name}={value!r} is not allowed; use an integer >= {minimum}{alternative}")


def require_channels(channels: Any, *, optional: bool = False) -> None:
    """Raise DataError unless channels is 1 or 3 (or None, when optional)."""
    if (channels in (1, 3) and not isinstance(channels, bool)) or (optional and channels is None):
        return
    alternative = ", 3 (RGB) or None" if optional else " or 3 (RGB)"
    raise DataError(f"channels={channels!r} is not allowed; choose 1 (grayscale){alternative}")
