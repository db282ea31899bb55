"""Small helpers for the raw SQL of the hot paths."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from django.db.backends.utils import CursorWrapper


def bigint_array(ids: Iterable[int]) -> str:
    """A `bigint[]` literal for `= ANY(%s::bigint[])`.

    Django's psycopg cursors bind parameters client-side, and quoting a Python list of 2000 ids
    element by element costs ~1.6 ms of CPU; this string costs ~0.25 ms (measured in issue 4).
    """
    # A bound string, not SQL: whatever it held could at worst be a malformed array.
    return "{" + ",".join(map(str, ids)) + "}"


def text_array(values: Iterable[str]) -> str:
    """A `text[]` literal for `%s::text[]`, as cheap as bigint_array: every element double-quoted,
    its backslashes and double quotes escaped, so any string (commas, braces, "NULL") stays itself."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def copy_rows(
    cursor: CursorWrapper, table: str, columns: str, types: Sequence[str], rows: Iterable[Sequence[object]]
) -> None:
    """COPY rows into `table` (its `columns`, comma-separated) in binary format.

    With declared types psycopg formats each row in C: ~6x less CPU than text rows (0.7 vs 4.2 ms
    per 2000 readings, measured in issue 4). Each value must match its type exactly (a float for
    float8, an int for int8).
    """
    with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)
