"""Printing metrics that may be undefined.

A metric without a value (a 0/0 precision or recall, a mean over nothing) is ``None`` in Python and ``null``
in JSON, never 0 and never NaN; tables print it as :data:`NA`. NaN is accepted as "no value" too, since pandas
turns None into NaN in float columns.
"""

from __future__ import annotations

import math

#: what a table prints for a metric without a value
NA = "n/a"


def missing(value) -> bool:
    """True for None and NaN (a metric without a value)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, spec: str) -> str:
    """``format(value, spec)``, or :data:`NA` (aligned by ``spec``'s width and fill) for a missing value.

    >>> fmt(12.345, ">6.1f"), fmt(None, ">6.1f")
    ('  12.3', '   n/a')
    """
    if not missing(value):
        return format(value, spec)
    # keep the alignment and width of the spec, drop its precision and type; right-aligned as numbers are
    width = spec.split(".")[0].rstrip("efgdn%").replace(",", "").replace("_", "")
    if width and not any(c in width for c in "<>^"):
        width = ">" + width.lstrip("0+- ")
    return format(NA, width)


def or_none(value) -> float | None:
    """A float, or None for a missing value (what ``metrics.json`` holds)."""
    return None if missing(value) else float(value)
