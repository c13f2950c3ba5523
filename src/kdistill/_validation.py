"""Argument checks shared by every constructor, so one bad value gets one error everywhere.

Each check returns the normalized value (``float``/``int``/``bool``) or raises: ``TypeError``
for a wrong type (bools are never numbers here), ``ValueError`` for a wrong value (NaN, inf,
out of bounds). Messages follow STYLE §5: `` `name` must be <X>, got <value!r>.``
"""

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_finite",
    "check_float_list",
    "check_int",
    "check_non_negative",
    "check_positive",
    "check_unit_interval",
]

# Upper bound for scale-like values (temperatures, weights): T² and products stay finite in fp32.
MAX_SCALE = 1e6


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}.")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return result


def check_finite(name: str, value: Any, *, max_abs: float = math.inf) -> float:
    """A finite real number (not a bool), optionally with ``|value| <= max_abs``."""
    result = _number(name, value)
    if abs(result) > max_abs:
        raise ValueError(f"`{name}` must be at most {max_abs:g} in magnitude, got {value!r}.")
    return result


def check_positive(name: str, value: Any, *, max_value: float = math.inf) -> float:
    """A finite number ``0 < value <= max_value``."""
    result = _number(name, value)
    if not 0 < result <= max_value:
        bound = "" if math.isinf(max_value) else f" and at most {max_value:g}"
        raise ValueError(f"`{name}` must be a finite number > 0{bound}, got {value!r}.")
    return result


def check_non_negative(name: str, value: Any, *, max_value: float = math.inf) -> float:
    """A finite number ``0 <= value <= max_value``."""
    result = _number(name, value)
    if not 0 <= result <= max_value:
        bound = "" if math.isinf(max_value) else f" and at most {max_value:g}"
        raise ValueError(f"`{name}` must be a finite number >= 0{bound}, got {value!r}.")
    return result


def check_unit_interval(
    name: str, value: Any, *, open_low: bool = False, open_high: bool = False
) -> float:
    """A number in ``[0, 1]``; ``open_low``/``open_high`` exclude an end point."""
    result = _number(name, value)
    low_ok = result > 0 if open_low else result >= 0
    high_ok = result < 1 if open_high else result <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")
    return result


def check_int(
    name: str, value: Any, *, min_value: int | None = None, max_value: int | None = None
) -> int:
    """An integer (not a bool, not a float) with optional inclusive bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} {value!r}.")
    result = int(value)
    if (min_value is not None and result < min_value) or (
        max_value is not None and result > max_value
    ):
        low = "" if min_value is None else f">= {min_value}"
        high = "" if max_value is None else f"<= {max_value}"
        bounds = " and ".join(b for b in (low, high) if b)
        raise ValueError(f"`{name}` must be an integer {bounds}, got {value!r}.")
    return result


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` (``0``/``1`` and strings are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of ``choices`` (strings)."""
    valid = sorted(choices)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"`{name}` must be one of {valid}, got {value!r}.")
    return value


def check_float_list(
    name: str,
    values: Any,
    *,
    min_len: int = 1,
    max_len: int = 10_000,
    non_negative: bool = False,
    max_abs: float = math.inf,
) -> list[float]:
    """A list/tuple of finite numbers (each checked like ``check_finite``)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"`{name}` must be a list of numbers, got {type(values).__name__}.")
    if not min_len <= len(values) <= max_len:
        raise ValueError(
            f"`{name}` must hold between {min_len} and {max_len} numbers, got {len(values)}."
        )
    check = check_non_negative if non_negative else check_finite
    kwargs = {"max_value": max_abs} if non_negative else {"max_abs": max_abs}
    return [check(f"{name}[{i}]", v, **kwargs) for i, v in enumerate(values)]
