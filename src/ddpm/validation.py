"""The checks of settings and arguments, in one place: types, ranges and choices.

Values arrive from Python keyword arguments, from JSON (where tuples come back as lists and 1.0 may
come back as 1), from TOML and from the command line. Every check raises a :class:`SettingError`, a
ValueError whose one-line message names the setting, the value and what is allowed; ``renamed``
gives the same error under another name, so the command line can say ``--steps`` where the library
said ``steps``.

    check_value("train.lr", 0.1, float)              # 0.1
    check_value("channel_mult", [1, 2], tuple[int, ...])  # (1, 2): the JSON form converted
    whole_number("steps", 0)                         # SettingError: steps = 0 is not allowed; ...
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import types
import typing
from typing import Any, Literal

__all__ = [
    "SettingError", "check_value", "check_fields", "check_range", "require_positive", "whole_number", "check_choice",
    "check_seed", "SEED_LIMIT", "describe_type", "choices_of", "options_of", "duration_seconds",
]

# torch's generators take 64-bit seeds, and a run derives seeds + 1, + 2 (and the test split's) from its own.
SEED_LIMIT = 2**62


class SettingError(ValueError):
    """A setting whose value is not allowed: "NAME = VALUE is not allowed; RULE" (one line).

    A name that is a command-line flag reads "--steps 0 is not allowed; ...".
    """

    def __init__(self, name: str, value: Any, rule: str):
        self.name, self.value, self.rule = name, value, rule
        shown = f"{name} {value}" if name.startswith("--") else f"{name} = {value!r}"
        super().__init__(f"{shown} is not allowed; {rule}")

    def renamed(self, name: str) -> SettingError:
        """The same error about the setting called ``name`` (e.g. "sample.eta" or "--eta")."""
        return SettingError(name, self.value, self.rule)


# --- types ----------------------------------------------------------------------------------------

def options_of(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of a union annotation (``int | None`` -> (int, NoneType)), or the annotation alone."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def choices_of(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation (or ``Literal[...] | None``), else None."""
    for option in options_of(annotation):
        if typing.get_origin(option) is Literal:
            return typing.get_args(option)
    return None


def describe_type(annotation: Any) -> str:
    """What an annotation allows, in words: "an integer or none", "'linear' | 'cosine'"."""
    words = []
    for option in options_of(annotation):
        if option is type(None):
            words.append("none")
        elif typing.get_origin(option) is Literal:
            words.append(" | ".join(repr(v) for v in typing.get_args(option)))
        elif typing.get_origin(option) is tuple:
            words.append(f"a list of {describe_type(typing.get_args(option)[0])}s".replace("an ", ""))
        else:
            words.append({int: "an integer", float: "a number", bool: "true or false", str: "a string",
                          dict: "a table"}[option])
    return " or ".join(words)


def _convert(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(True, the value in the annotation's type) when ``value`` fits, else (False, None).

    bool is never an int here (ch=True is a mistake, not 1); an integer is a float (JSON writes 1.0
    as 1); a list is a tuple (JSON has no tuples); numpy's integers are ints."""
    for option in options_of(annotation):
        origin = typing.get_origin(option)
        if option is type(None):
            if value is None:
                return True, None
        elif origin is Literal:
            if value in typing.get_args(option) and not isinstance(value, bool):
                return True, value
        elif origin is tuple:
            if isinstance(value, (tuple, list)):
                items = [_convert(item, typing.get_args(option)[0]) for item in value]
                if all(ok for ok, _ in items):
                    return True, tuple(item for _, item in items)
        elif option is bool:
            if isinstance(value, bool):
                return True, value
        elif option is int:
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                return True, int(value)
        elif option is float:
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                return True, float(value)
        elif option in (str, dict):
            if isinstance(value, option):
                return True, value
        else:
            raise TypeError(f"unsupported annotation {option!r}")  # a bug in a dataclass, not the user's
    return False, None


def check_value(name: str, value: Any, annotation: Any) -> Any:
    """``value`` converted to ``annotation``'s type (int, float, bool, str, dict, Literal,
    tuple[X, ...] and unions with None), or a SettingError naming ``name``."""
    ok, converted = _convert(value, annotation)
    if ok:
        return converted
    options = options_of(annotation)
    if all(typing.get_origin(o) is Literal or o is type(None) for o in options):  # a choice
        none = " (or none)" if type(None) in options else ""
        raise SettingError(name, value, f"choose from: {', '.join(map(str, choices_of(annotation)))}{none}")
    raise SettingError(name, value, f"expected {describe_type(annotation)}")


def check_fields(instance: Any, prefix: str = "") -> None:
    """Check every field of a (frozen) dataclass against its annotation, converting JSON forms in place,
    then against its metadata's ``minimum`` / ``maximum``. Called from ``__post_init__``."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        name = prefix + f.name
        value = check_value(name, getattr(instance, f.name), hints[f.name])
        if value is not getattr(instance, f.name):
            object.__setattr__(instance, f.name, value)  # how a frozen dataclass updates itself
        check_range(name, value, **{k: f.metadata[k] for k in _BOUNDS if k in f.metadata})


_BOUNDS = ("minimum", "maximum", "above", "below")


def check_range(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None, below: float | None = None) -> None:
    """A SettingError unless the number ``value`` (or each number of a tuple) lies within the bounds:
    minimum and maximum are inclusive, above and below exclusive. None and strings pass; nan fails."""
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if (item != item or (minimum is not None and item < minimum) or (maximum is not None and item > maximum)
                or (above is not None and not item > above) or (below is not None and not item < below)):
            raise SettingError(name, value, _range_rule(minimum, maximum, above, below, isinstance(item, int)))


def require_positive(instance: Any, *names: str) -> None:
    """A SettingError unless each named int field of ``instance`` (each item of a tuple field) is >= 1."""
    for name in names:
        check_range(name, getattr(instance, name), minimum=1)


def _range_rule(minimum: float | None, maximum: float | None, above: float | None, below: float | None,
                integer: bool) -> str:
    if integer and minimum is not None and maximum is not None:
        return f"it must be in {minimum}..{maximum}"
    low = f"[{minimum:g}" if minimum is not None else f"({above:g}" if above is not None else None
    high = f"{maximum:g}]" if maximum is not None else f"{below:g})" if below is not None else None
    if low and high:
        return f"it must be in {low}, {high}"
    if minimum is not None:
        return f"it must be at least {minimum:g}" if minimum else "it must be 0 or more"
    if above is not None:
        return f"it must be more than {above:g}" if above else "it must be a positive number"
    return f"it must be at most {maximum:g}" if maximum is not None else f"it must be less than {below:g}"


# --- single values --------------------------------------------------------------------------------

def whole_number(name: str, value: Any, minimum: int = 1, maximum: int | None = None, *,
                 optional: bool = False, error: type[ValueError] | None = None) -> int | None:
    """``value`` as an int in minimum..maximum (numpy's integers too; a bool is refused), or None when
    ``optional``; else a SettingError (or ``error``, with the same message) naming ``name``."""
    if optional and value is None:
        return None
    in_range = (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
                and (maximum is None or value <= maximum))
    if in_range:
        return int(value)
    upper = f"..{maximum}" if maximum is not None else ""
    rule = (f"use an integer in {minimum}{upper}" if upper else f"use an integer >= {minimum}")
    problem = SettingError(name, value, rule + (" or None" if optional else ""))
    raise problem if error is None else error(str(problem))


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(name: str, text: str) -> float:
    """A wall-clock duration written as "90s", "20m", "1.5h" or "1h30m" (a bare number is seconds), in
    seconds; a SettingError naming ``name`` for anything else or for a duration that is not positive."""
    spelled = str(text).strip().lower().replace(" ", "")
    parts = re.fullmatch(r"((?:\d+(?:\.\d*)?|\.\d+)[smh])+", spelled)
    if re.fullmatch(r"\d+(?:\.\d*)?", spelled):
        seconds = float(spelled)
    elif parts:
        seconds = sum(float(number) * _UNITS[unit] for number, unit in re.findall(r"([\d.]+)([smh])", spelled))
    else:
        raise SettingError(name, text, 'write a duration like "90s", "20m", "1.5h" or "1h30m"')
    if not 0 < seconds < float("inf"):
        raise SettingError(name, text, "the duration must be more than 0 seconds")
    return seconds


def check_choice(name: str, value: object, allowed: tuple[str, ...] | typing.Iterable[str]) -> None:
    """Raise ValueError naming ``value`` and the allowed choices unless ``value`` is one of them."""
    allowed = tuple(allowed)
    if isinstance(value, bool) or value not in allowed:
        raise SettingError(name, value, f"choose from: {', '.join(map(str, allowed))}")


def check_seed(value: Any, name: str) -> int:
    """``value`` as an int seed torch can take with room for the seeds derived from it, else a
    SettingError that names ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(name, value, "a seed is an integer")
    if not abs(value) < SEED_LIMIT:
        raise SettingError(name, value, "a seed lies between -2**62 and 2**62")
    return int(value)
