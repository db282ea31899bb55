"""The storage writer: a batch of prepared messages -> `telemetry_raw` rows and
`telemetry_history` readings (binary COPY, in the caller's transaction; redeliveries absorbed by
the ingest key, across midnight too), and `devices.last_seen`
kept to within ARGUS_LAST_SEEN_RESOLUTION_SECONDS (the `devices_heard` hook tells the apps
above, e.g. assets' last_telemetry_at)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from argus.registry import current_schema
from argus.sql import bigint_array, copy_rows
from telemetry import hooks
from telemetry.adapters import msg_id_of
from telemetry.messages import BatchResult, Feedback, Prepared
from telemetry.models import RawStatus

log = logging.getLogger(__name__)

STAGE_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS ingest_raw_stage (
    device_id bigint, logical_identifier text, msg_id text, ingest_key text, payload bytea,
    received_at timestamptz, transport text, status text, reason text, readings integer
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ingest_history_stage (
    time timestamptz, device_id bigint, metric text, value double precision, raw_id bigint
) ON COMMIT DELETE ROWS;
"""


def write_prepared(prepared: list[Prepared]) -> tuple[BatchResult, dict[str, int]]:
    """Insert the batch's new raw rows, then the readings of the accepted ones; one transaction.

    Returns the outcome and the ids of the raw rows inserted (by ingest key).
    """
    result = BatchResult()
    unique: dict[str, Prepared] = {}
    for item in prepared:
        key = item.ingest_key
        if key in unique:
            result.duplicates += 1
        else:
            unique[key] = item
    inserted = _insert_raw(unique)
    result.duplicates += len(unique) - len(inserted)
    # device id -> when we last heard from it: senders at receive time, children by reading time
    seen: dict[int, datetime] = {}
    readings: list[tuple[int, datetime, dict[str, float], int]] = []
    for key, raw_id in inserted.items():
        item = unique[key]
        if item.status == RawStatus.ACCEPTED:
            result.accepted += 1
        elif item.status == RawStatus.REJECTED:
            result.rejected += 1
            if item.device_type is not None and item.device_type.error_feedback and item.message.transport == "mqtt":
                msg_id = item.decoded.msg_id if item.decoded is not None else msg_id_of(item.message.payload)
                result.feedback.append(Feedback(item.message.logical_id, msg_id, item.reason, item.message.received_at))
        else:
            result.chunks += 1
        if item.device is not None:
            heard = seen.get(item.device.id)
            if heard is None or heard < item.message.received_at:
                seen[item.device.id] = item.message.received_at
        readings.extend((device_id, time, values, raw_id) for device_id, time, values in item.rows)
    write_readings(readings, result, seen)
    return result, inserted


RAW_COLUMNS = (
    "device_id, logical_identifier, msg_id, ingest_key, payload, received_at, transport, status, reason, readings"
)
RAW_TYPES = ["int8", "text", "text", "text", "bytea", "timestamptz", "text", "text", "text", "int4"]
HISTORY_COLUMNS = "time, device_id, metric, value, raw_id"
HISTORY_TYPES = ["timestamptz", "int8", "text", "float8", "int8"]


def _raw_row(key: str, item: Prepared) -> tuple[object, ...]:
    return (
        item.device.id if item.device else None,
        item.message.logical_id,
        item.decoded.msg_id if item.decoded else None,
        key,
        item.message.payload,
        item.message.received_at,
        item.message.transport,
        item.status,
        item.reason,
        sum(len(values) for _, _, values in item.rows),
    )


DAY_SECONDS = 86400


def near_midnight(at: datetime, window: float) -> bool:
    """Whether a copy of a message received at `at` may have been received on the other side of a
    UTC midnight (at most `window` seconds earlier or later)."""
    since = at.timestamp() % DAY_SECONDS
    return since < window or DAY_SECONDS - since <= window


def _stored_across_midnight(keys: list[str], earliest: datetime, latest: datetime) -> set[str]:
    """Which of these ingest keys of messages received near midnight are stored already, on either
    side of it.

    The ingest key is unique within a day's partition only (docs/retention.md), so a copy
    redelivered after midnight would not meet its first copy's key. Each key's advisory lock is
    held to the end of the transaction: two copies stored at once on both sides of midnight take
    turns, and the second sees the first.
    """
    window = timedelta(seconds=settings.ARGUS_RAW_DEDUPE_WINDOW_SECONDS)
    with connection.cursor() as cursor:
        # In one order (of the lock ids) in every process, so two batches cannot deadlock.
        cursor.execute(
            "SELECT pg_advisory_xact_lock(h) FROM "
            "(SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest(%s::text[]) AS k ORDER BY 1) AS locks",
            [keys],
        )
        cursor.execute(
            "SELECT ingest_key FROM telemetry_raw WHERE ingest_key = ANY(%s::text[]) "
            "AND received_at >= %s AND received_at < %s",
            [keys, earliest - window, latest + window],
        )
        return {row[0] for row in cursor.fetchall()}


def _insert_raw(unique: dict[str, Prepared]) -> dict[str, int]:
    """Insert the raw rows not stored before; ingest key -> raw id.

    The common case (nothing stored before) is one COPY straight into the table with ids taken
    from its sequence. A redelivered message makes that COPY fail on the day partition's unique
    ingest key; then, after rolling back to a savepoint, the batch goes through a staging table
    and `ON CONFLICT DO NOTHING`. Messages received within ARGUS_RAW_DEDUPE_WINDOW_SECONDS of
    midnight are first looked up on both sides of it.
    """
    if not unique:
        return {}
    window = float(settings.ARGUS_RAW_DEDUPE_WINDOW_SECONDS)
    near = [key for key, item in unique.items() if near_midnight(item.message.received_at, window)]
    if near:
        times = [unique[key].message.received_at for key in near]
        stored = _stored_across_midnight(near, min(times), max(times))
        if stored:
            unique = {key: item for key, item in unique.items() if key not in stored}
            if not unique:
                return {}
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT nextval(pg_get_serial_sequence('telemetry_raw', 'id')) FROM generate_series(1, %s)",
                [len(unique)],
            )
            ids = [row[0] for row in cursor.fetchall()]
            stored_at = timezone.now()
            copy_rows(
                cursor,
                "telemetry_raw",
                f"id, stored_at, {RAW_COLUMNS}",
                ["int8", "timestamptz", *RAW_TYPES],
                (
                    (raw_id, stored_at, *_raw_row(key, item))
                    for raw_id, (key, item) in zip(ids, unique.items(), strict=True)
                ),
            )
            return dict(zip(unique, ids, strict=True))
    except psycopg.errors.UniqueViolation:
        pass
    with connection.cursor() as cursor:
        cursor.execute(STAGE_TABLES)
        copy_rows(
            cursor, "ingest_raw_stage", RAW_COLUMNS, RAW_TYPES, (_raw_row(key, item) for key, item in unique.items())
        )
        cursor.execute(
            f"""
            INSERT INTO telemetry_raw (stored_at, {RAW_COLUMNS})
            SELECT clock_timestamp(), {RAW_COLUMNS} FROM ingest_raw_stage
            ON CONFLICT DO NOTHING
            RETURNING id, ingest_key
            """
        )
        return {key: raw_id for raw_id, key in cursor.fetchall()}


def _insert_history(rows: list[tuple[datetime, int, str, float, int]]) -> int:
    """Insert readings; returns how many were new. A second reading of one (device, metric,
    time) keeps the first value. COPY straight into the table, or, when that meets an existing
    key, through a staging table with `ON CONFLICT DO NOTHING`."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            copy_rows(cursor, "telemetry_history", HISTORY_COLUMNS, HISTORY_TYPES, rows)
            return len(rows)
    except psycopg.errors.UniqueViolation:
        pass
    with connection.cursor() as cursor:
        cursor.execute(STAGE_TABLES)
        copy_rows(cursor, "ingest_history_stage", HISTORY_COLUMNS, HISTORY_TYPES, rows)
        cursor.execute(
            f"INSERT INTO telemetry_history ({HISTORY_COLUMNS}) "
            f"SELECT {HISTORY_COLUMNS} FROM ingest_history_stage ON CONFLICT DO NOTHING"
        )
        return cursor.rowcount


# (schema, device id) -> the last_seen slot this process last wrote. A device heard from again in
# the same slot needs no statement at all: without this, each reassembly's UPDATE looked up all
# 2000 children to change none of them. (Another process may have written a later time in the
# slot; last_seen then lags by up to two resolutions.)
_last_seen_slots: dict[tuple[str, int], int] = {}
LAST_SEEN_MEMORY = 500_000


def write_readings(
    readings: Sequence[tuple[int, datetime, dict[str, float], int]],
    result: BatchResult,
    seen: dict[int, datetime],
) -> None:
    """Insert (device, time, values, raw id) readings and mark devices and assets as heard from.

    Fills `result.readings`, `result.conflicts` and `result.latest`; `seen` maps device id to the
    time we last heard from it (updated with the readings' own times).
    """
    rows: list[tuple[datetime, int, str, float, int]] = []
    add_row = rows.append  # per reading, in a plain loop: a generator per reading cost more
    latest = result.latest
    for device_id, time, values, raw_id in readings:
        for metric, value in values.items():
            add_row((time, device_id, metric, value, raw_id))
        newest = latest.get(device_id)
        if newest is None:
            latest[device_id] = (time, values)  # never mutated: merges below make new dicts
        elif newest[0] <= time:
            latest[device_id] = (time, {**newest[1], **values})
    if rows:
        written = _insert_history(rows)
        result.readings += written
        result.conflicts += len(rows) - written
        if len(rows) > written:
            log.warning(
                "readings with an existing (device, metric, time) kept the first value: %d", len(rows) - written
            )
    with connection.cursor() as cursor:
        for device_id, (time, _) in result.latest.items():
            if device_id not in seen or seen[device_id] < time:
                seen[device_id] = time
        if not seen:
            return
        # A process rewrites a device's row at most once per slot of the resolution (remembered
        # in _last_seen_slots), and the SQL guard keeps other processes from rewriting it within
        # half a resolution (a whole one would skip a device whose first slot was short: written
        # when first heard from, less than a resolution before its next boundary). Under load
        # most devices are heard from every batch, and rewriting each row every time would cost
        # more than the readings themselves. Each device's slots are offset by its id: with
        # common boundaries all 40,000 beacons of the chunk benchmark were rewritten in the same
        # second, a latency spike every slot. One statement per slot, with a plain id array
        # (binding thousands of timestamps is slow).
        resolution = float(settings.ARGUS_LAST_SEEN_RESOLUTION_SECONDS)
        schema = current_schema()
        slots: dict[int, tuple[datetime, list[int]]] = {}
        for device_id, heard in seen.items():
            slot = int((heard.timestamp() + device_id % resolution) // resolution) if resolution > 0 else 0
            if resolution > 0 and _last_seen_slots.get((schema, device_id)) == slot:
                continue
            slot_time, ids = slots.get(slot, (heard, []))
            ids.append(device_id)
            slots[slot] = (max(slot_time, heard), ids)
        if len(_last_seen_slots) > LAST_SEEN_MEMORY:
            _last_seen_slots.clear()
        for slot, (heard, ids) in slots.items():
            if resolution > 0:
                _last_seen_slots.update(((schema, device_id), slot) for device_id in ids)
            id_array = bigint_array(ids)
            cursor.execute(
                "UPDATE devices SET last_seen = %s WHERE id = ANY(%s::bigint[]) "
                "AND (last_seen IS NULL OR last_seen < %s - make_interval(secs => %s))",
                [heard, id_array, heard, resolution / 2],
            )
            hooks.devices_heard(heard, ids, resolution)
