"""Argument checks shared by every module (pure Python: usable by the tensor core, no Lightning)."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an integer ``>= minimum`` (``bool`` is not), else a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive_number(name: str, value: Any, what: str = "a number") -> float:
    """``value`` as a float if it is a number ``> 0`` (``bool`` and NaN are not), else a ``ValueError`` saying
    ``name must be <what> > 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be {what} > 0, got {value!r}")
    return float(value)
