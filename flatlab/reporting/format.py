"""Number formatting shared by report tables: missing or non-finite values show as ``n/a``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MISSING = "n/a"


def num(value: Any) -> float | None:
    """``float(value)`` if it is a finite number, else ``None``."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def relative_change(value: float | None, base: float | None) -> float | None:
    """``(value - base) / |base|``; ``None`` when either is missing or ``base`` is zero."""
    value, base = num(value), num(base)
    if value is None or base is None or base == 0:
        return None
    return (value - base) / abs(base)


def fmt(value: Any) -> str:
    value = num(value)
    return MISSING if value is None else f"{value:.4g}"


def fmt_int(value: Any) -> str:
    value = num(value)
    return MISSING if value is None else str(int(value))


def fmt_pct(value: Any) -> str:
    """A fraction in percent with two decimals."""
    value = num(value)
    return MISSING if value is None else f"{100 * value:.2f}"


def fmt_rel(value: Any) -> str:
    """A relative change as a signed percentage."""
    value = num(value)
    return MISSING if value is None else f"{100 * value:+.1f}%"


def fmt_trace(estimate: Any, stderr: Any) -> str:
    """``estimate ± stderr``."""
    if num(estimate) is None:
        return MISSING
    return fmt(estimate) + ("" if num(stderr) is None else f" ± {num(stderr):.2g}")


def format_hyperparameters(kwargs: Mapping | None, skip: Mapping | None = None) -> str:
    """``{"lr": 0.1, "rho": 0.05}`` -> ``"lr=0.1, rho=0.05"`` (sorted; ``None`` values and the
    keys in ``skip`` dropped)."""
    return ", ".join(f"{key}={_value(value)}" for key, value in sorted((kwargs or {}).items())
                     if value is not None and key not in (skip or {}))


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
