"""Checks shared by the models: config field types at construction, input shapes at call time.

Configs arrive from Python keyword arguments, from JSON (where tuples come back as lists and 0.0 may
come back as 0) and later from the command line. ``check_field_types`` accepts those forms, converts
them to the annotated type, and raises a ValueError naming the field, the value and the allowed type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from torch import Tensor


def check_field_types(config: Any) -> None:
    """Check every field of a frozen dataclass against its annotation, converting JSON forms in place.

    Supported annotations: int, float, bool, str, Literal[...], tuple[int, ...] and ``X | None``.
    Called from ``__post_init__``; ``object.__setattr__`` is how a frozen dataclass updates itself there.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        converted = _convert(field.name, value, hints[field.name])
        if converted is not value:
            object.__setattr__(config, field.name, converted)


def _convert(name: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(name, value, inner)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}={value!r} is not allowed; choose from: {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        # Only homogeneous tuples (tuple[int, ...]) appear in the model configs.
        if not isinstance(value, (tuple, list)):
            raise ValueError(f"{name} must be a sequence of {args[0].__name__}, got {value!r}")
        return tuple(_convert(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        # bool is a subclass of int in Python, but ch=True is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value) if not isinstance(value, float) else value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {hint!r} on config field {name}")  # a bug in a config class


def require_positive(config: Any, *names: str) -> None:
    """Raise ValueError unless each named int field (or each item of a tuple field) is >= 1."""
    for name in names:
        value = getattr(config, name)
        items = value if isinstance(value, tuple) else (value,)
        if any(item < 1 for item in items):
            raise ValueError(f"{name} must be positive, got {value!r}")


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
