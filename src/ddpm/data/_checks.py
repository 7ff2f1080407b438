"""Argument checks shared by the data loaders: ddpm.validation's, raising DataError (one line)."""

from __future__ import annotations

from typing import Any

from ddpm.data.errors import DataError
from ddpm.validation import SettingError, whole_number


def require_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> None:
    """Raise DataError unless value is an int >= minimum (or None, when optional). bool is refused."""
    whole_number(name, value, minimum, optional=optional, error=DataError)


def require_channels(channels: Any, *, optional: bool = False) -> None:
    """Raise DataError unless channels is 1 or 3 (or None, when optional)."""
    if (channels in (1, 3) and not isinstance(channels, bool)) or (optional and channels is None):
        return
    alternative = ", 3 (RGB) or None" if optional else " or 3 (RGB)"
    raise DataError(str(SettingError("channels", channels, f"choose 1 (grayscale){alternative}")))
