"""Argument checks for the public entry points.

Every message names the argument in backticks, states the rule and shows the
value that was received, e.g. ``"`lr` must be a non-negative float, got -1"``.
User input is never checked with ``assert``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_nonneg_float",
    "check_positive_float",
    "check_positive_int",
    "check_unit_interval",
]


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_nonneg_float(name: str, value: Any) -> float:
    """``value >= 0`` and finite."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative float, got {value!r}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """``value > 0`` and finite."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a positive float, got {value!r}")
    return float(value)


def check_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> float:
    """``0 <= value < 1`` (or ``<= 1`` with ``closed_right``)."""
    ok = _is_real(value) and math.isfinite(value) and 0 <= value and (value <= 1 if closed_right else value < 1)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"`{name}` must be a float in {interval}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """``0 < value <= 1``."""
    if not _is_real(value) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a float in (0, 1], got {value!r}")
    return float(value)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """A positive ``int`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive integer{extra}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")
    return value
