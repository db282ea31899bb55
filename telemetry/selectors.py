"""Reads of telemetry's tables for the apps above it (assets' alerts and health, the read API),
so that no other app writes SQL against `telemetry_history`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection
from django.db.backends.utils import CursorWrapper
from psycopg.types.datetime import TimestamptzLoader

from argus.sql import bigint_array, text_array

# device id -> metric -> (device time, value)
LatestReadings = dict[int, dict[str, tuple[datetime, float]]]


def _times_loaded_in_c(cursor: CursorWrapper) -> CursorWrapper:
    """Load this cursor's timestamptz columns with psycopg's own loader instead of Django's.

    Django's is a Python subclass of psycopg's (to attach the connection's time zone) and costs
    ~5 us a value, psycopg's C one ~0.6 us (3,000 times: 15.7 vs 1.9 ms, measured for issue 12).
    psycopg's gives the session's time zone, which Django sets to the connection's (UTC here):
    the same aware datetimes. The registration is the cursor's own (psycopg copies the adapters
    map on write), not the connection's.
    """
    cursor.cursor.adapters.register_loader("timestamptz", TimestamptzLoader)
    return cursor


# How far before a device's last_seen its newest readings are looked for first (device time lags
# the receive time by the pipeline's latency; more for readings a device buffered offline).
LATEST_WINDOW = timedelta(hours=1)


def latest_readings(device_metrics: Mapping[int, Collection[str]]) -> LatestReadings:
    """The newest reading (by device time) of each named metric of each device.

    One index probe per (device, metric) pair: the primary key (device_id, metric, time) read
    backwards, stopping at the first row. Scanning a device's rows instead (DISTINCT ON) reads
    every reading it sent in the window.

    The probe is bounded below by the device's last_seen - LATEST_WINDOW, so that run-time
    partition pruning leaves only the newest daily partitions (and the empty future ones and the
    DEFAULT partition): because of the DEFAULT partition PostgreSQL cannot read the partitions
    newest first and stop (ordered Append), and an unbounded `ORDER BY time DESC LIMIT 1` is a
    MergeAppend that descends into every partition's index (21 per pair on a 12-day table: 0.7 s
    for 3,000 pairs, BENCHMARKS.md). A row found at or after the bound is the newest of all; a
    pair with none there (its device's clock behind, a metric no longer sent, no last_seen) is
    probed again without the bound, so the result does not depend on last_seen being right.
    """
    devices: list[int] = []
    metrics: list[str] = []
    for device_id, names in device_metrics.items():
        for name in names:
            devices.append(device_id)
            metrics.append(name)
    latest: LatestReadings = {}
    if not devices:
        return latest
    with connection.cursor() as cursor:
        _times_loaded_in_c(cursor)
        cursor.execute(
            """
            WITH p AS MATERIALIZED (
                SELECT p.device_id, p.metric, d.last_seen - %s::interval AS since
                FROM unnest(%s::bigint[], %s::text[]) AS p(device_id, metric)
                LEFT JOIN devices d ON d.id = p.device_id
            ),
            recent AS MATERIALIZED (
                SELECT p.device_id, p.metric, h.time, h.value
                FROM p CROSS JOIN LATERAL (
                    SELECT t.time, t.value FROM telemetry_history t
                    WHERE t.device_id = p.device_id AND t.metric = p.metric AND t.time >= p.since
                    ORDER BY t.time DESC LIMIT 1
                ) h
            ),
            missing AS MATERIALIZED (
                SELECT p.device_id, p.metric FROM p
                WHERE NOT EXISTS (SELECT FROM recent r WHERE r.device_id = p.device_id AND r.metric = p.metric)
            )
            SELECT device_id, metric, time, value FROM recent
            UNION ALL
            SELECT m.device_id, m.metric, h.time, h.value
            FROM missing m CROSS JOIN LATERAL (
                SELECT t.time, t.value FROM telemetry_history t
                WHERE t.device_id = m.device_id AND t.metric = m.metric
                ORDER BY t.time DESC LIMIT 1
            ) h
            """,
            # Array literals: binding 3,000-element lists element by element costs milliseconds.
            [f"{LATEST_WINDOW.total_seconds()} seconds", bigint_array(devices), text_array(metrics)],
        )
        for device_id, metric, time, value in cursor.fetchall():
            latest.setdefault(device_id, {})[metric] = (time, value)
    return latest


@dataclass(frozen=True, slots=True)
class Bucket:
    """Aggregates of one metric's readings in [time, time + bucket)."""

    time: datetime
    avg: float
    min: float
    max: float
    count: int


@dataclass(frozen=True, slots=True)
class Point:
    """One stored reading."""

    time: datetime
    value: float


# date_bin's origin: buckets of a day or less start on whole minutes, hours and days (UTC).
_BUCKET_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


def history_buckets(*, device_id: int, metric: str, start: datetime, end: datetime, bucket: timedelta) -> list[Bucket]:
    """A metric's readings in [start, end) aggregated per bucket (device time), oldest first; empty
    buckets are left out.

    Reads one range of the primary key (device_id, metric, time) in the partitions the range
    touches; the aggregation runs in PostgreSQL, so only the buckets cross the wire.
    """
    with connection.cursor() as cursor:
        _times_loaded_in_c(cursor)
        cursor.execute(
            """
            SELECT date_bin(%s::interval, time, %s) AS bucket, avg(value), min(value), max(value), count(*)
            FROM telemetry_history
            WHERE device_id = %s AND metric = %s AND time >= %s AND time < %s
            GROUP BY bucket ORDER BY bucket
            """,
            [f"{bucket.total_seconds()} seconds", _BUCKET_ORIGIN, device_id, metric, start, end],
        )
        return [Bucket(time, avg, low, high, count) for time, avg, low, high, count in cursor.fetchall()]


def history_points(
    *, device_id: int, metric: str, start: datetime, end: datetime, after: datetime | None = None, limit: int
) -> list[Point]:
    """Up to `limit` raw readings in [start, end), oldest first, from just after `after` (a cursor:
    the time of the last point of the previous page; the key makes times unique per metric)."""
    # One of two constant conditions: the cursor, or the start of the range.
    since_sql, params = ("time > %s", [after]) if after is not None else ("time >= %s", [start])
    with connection.cursor() as cursor:
        _times_loaded_in_c(cursor)
        cursor.execute(
            f"""
            SELECT time, value FROM telemetry_history
            WHERE device_id = %s AND metric = %s AND {since_sql} AND time >= %s AND time < %s
            ORDER BY time LIMIT %s
            """,
            [device_id, metric, *params, start, end, limit],
        )
        return [Point(time, value) for time, value in cursor.fetchall()]


def metrics_of_device(device_id: int) -> list[str]:
    """Every metric name a device has stored readings of, found by skipping through the primary
    key (one index probe per name) rather than reading its rows."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH RECURSIVE names(metric) AS (
                SELECT min(metric) FROM telemetry_history WHERE device_id = %s
                UNION ALL
                SELECT (SELECT min(metric) FROM telemetry_history WHERE device_id = %s AND metric > names.metric)
                FROM names WHERE names.metric IS NOT NULL
            )
            SELECT metric FROM names WHERE metric IS NOT NULL
            """,
            [device_id, device_id],
        )
        return [name for (name,) in cursor.fetchall()]
