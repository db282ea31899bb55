"""Small helpers for the raw SQL of the hot paths."""

from __future__ import annotations

from collections.abc import Iterable


def bigint_array(ids: Iterable[int]) -> str:
    """A `bigint[]` literal for `= ANY(%s::bigint[])`.

    Django's psycopg cursors bind parameters client-side, and quoting a Python list of 2000 ids
    element by element costs ~1.6 ms of CPU; this string costs ~0.25 ms (measured in issue 4).
    """
    # A bound string, not SQL: whatever it held could at worst be a malformed array.
    return "{" + ",".join(map(str, ids)) + "}"
