"""How numbers read in every report: one definition, so Markdown, HTML and the console agree.

Every function accepts whatever a JSON record may hold (None, NaN, a string) and says "n/a"
rather than failing or printing a misleading number. Like ``fedspine.fileio`` it imports nothing
from fedspine, so every layer may use it.
"""

from __future__ import annotations

import math
from typing import Any

NOT_AVAILABLE = "n/a"


def finite(value: Any) -> float | None:
    """``value`` as a finite float, or None for None, NaN, ±inf, booleans and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # json.loads gives ints beyond float range as int
        return None
    return number if math.isfinite(number) else None


def num(value: Any, digits: int = 3, style: str = "f") -> str:
    """A number at ``digits`` in format ``style`` ("f", "e", "g"), or "n/a"."""
    number = finite(value)
    return NOT_AVAILABLE if number is None else f"{number:.{digits}{style}}"


def pct(value: Any, digits: int = 1) -> str:
    """A fraction as a percentage ("12.5 %"), or "n/a"."""
    number = finite(value)
    return NOT_AVAILABLE if number is None else f"{100 * number:.{digits}f} %"


def signed(value: Any, digits: int = 2) -> str:
    """A number with a true minus sign, so a negative value is not read as a dash."""
    return num(value, digits).replace("-", "−")


def auc_ci(value: Any, ci: Any, digits: int = 3) -> str:
    """ "0.712 [0.650, 0.770]"; "[no interval]" when the interval is missing; "n/a" without a value."""
    if finite(value) is None:
        return NOT_AVAILABLE
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(finite(c) is not None for c in ci):
        return f"{num(value, digits)} [{num(ci[0], digits)}, {num(ci[1], digits)}]"
    return f"{num(value, digits)} [no interval]"
