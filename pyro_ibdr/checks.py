"""Argument checks shared by the public API: each failure names the argument, the value and what was expected."""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import types
import typing
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1 (bools and floats such as 2.5 or 1e3 are refused).

    :raises TypeError: for a non-integer; :raises ValueError: for an integer < 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (a positive integer), got {value}")
    return int(value)


def real_number(name: str, value: Any) -> float:
    """``value`` as a float that is not NaN (bools, strings and tensors are refused).

    :raises TypeError: for a non-number; :raises ValueError: for NaN.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got NaN")
    return float(value)


def positive_number(name: str, value: Any) -> float:
    """``value`` as a float > 0 (:func:`real_number`).

    :raises TypeError: for a non-number; :raises ValueError: for NaN or a number ≤ 0.
    """
    if not real_number(name, value) > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (numbers must not be bools; floats must not be NaN)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_matches(v, a) for v, a in zip(value, args, strict=True)))
    if origin is collections.abc.Callable:
        return callable(value)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # annotations this checker does not know are not checked


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "None"
    if hint is float:
        return "a number (not NaN)"
    if origin is tuple:
        return f"a tuple of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is collections.abc.Callable:
        return "a callable"
    return getattr(hint, "__name__", str(hint))


def check_field_types(obj: Any) -> None:
    """Check every field of a dataclass instance against its annotation (settings built from user options).

    :raises ValueError: for a value outside a ``Literal``'s choices, or NaN, naming the class, field and value.
    :raises TypeError: for a value of another type, naming the class, field, value and the expected type.
    """
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value, hint = getattr(obj, field.name), hints[field.name]
        if not _matches(value, hint):
            wrong_value = typing.get_origin(hint) is typing.Literal or (isinstance(value, float) and math.isnan(value))
            raise (ValueError if wrong_value else TypeError)(
                f"{type(obj).__name__}.{field.name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})"
            )
