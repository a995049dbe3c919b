"""Property tests of fedspine.formatting: every report reads JSON records it did not write, so a
formatter must turn any JSON value into a string (a number, or "n/a") and never raise."""

from __future__ import annotations

import math
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from fedspine.formatting import NOT_AVAILABLE, auc_ci, finite, num, pct, signed

FAST = settings(max_examples=200, deadline=None, database=None)

# What json.loads can return (integers beyond float range: see the last test).
FLOAT_RANGE_INTS = st.integers(min_value=-(10**300), max_value=10**300)
# No subnormals: a library loaded by other tests may switch them off (flush to zero), and
# hypothesis then refuses to draw them.
FLOATS = st.floats(allow_subnormal=False)
FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False)
SCALARS = st.none() | st.booleans() | FLOAT_RANGE_INTS | FLOATS | st.text(max_size=12)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
DIGITS = st.integers(min_value=0, max_value=6)


@FAST
@given(value=JSON_VALUES, ci=JSON_VALUES, digits=DIGITS)
def test_formatters_never_raise_on_json_values(value, ci, digits) -> None:
    for text in (
        num(value, digits),
        num(value, digits, "e"),
        num(value, digits, "g"),
        pct(value, digits),
        signed(value, digits),
        auc_ci(value, ci, digits),
        auc_ci(value, [value, ci], digits),
    ):
        assert isinstance(text, str) and text
    number = finite(value)
    assert number is None or math.isfinite(number)
    # "n/a" exactly when there is no finite number to show.
    assert (num(value, digits) == NOT_AVAILABLE) == (number is None)
    assert (auc_ci(value, ci, digits) == NOT_AVAILABLE) == (number is None)


@FAST
@given(value=st.floats(-1e12, 1e12, allow_subnormal=False))
def test_a_finite_number_reads_back_within_its_rounding(value: float) -> None:
    digits = 3
    # Half a unit in the last digit shown, plus the float's own rounding of both numbers.
    slack = abs(value) * 4.5e-16 + 1e-12
    assert abs(float(num(value, digits)) - value) <= 0.5 * 10**-digits + slack
    assert signed(value, digits).replace("−", "-") == num(value, digits)
    low, high = value - 1, value + 1
    shown = auc_ci(value, [low, high], digits)
    assert shown == f"{num(value, digits)} [{num(low, digits)}, {num(high, digits)}]"


@FAST
@given(value=FINITE_FLOATS, ci=JSON_VALUES)
def test_an_interval_is_shown_only_when_both_ends_are_numbers(value: float, ci) -> None:
    shown = auc_ci(value, ci)
    whole = isinstance(ci, list) and len(ci) == 2 and all(finite(end) is not None for end in ci)
    assert shown.endswith("[no interval]") != whole


def test_an_integer_beyond_float_range_reads_not_available() -> None:
    huge = 10 ** (sys.float_info.max_10_exp + 1)
    assert num(huge) == NOT_AVAILABLE
