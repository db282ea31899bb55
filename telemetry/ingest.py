"""The ingest service: one tenant's batch of messages -> raw rows + readings, in one transaction.

Called by the JetStream consumer inside the tenant's schema. Bad input never raises: each
message ends as an accepted raw row with its readings, or a rejected raw row with its reason.
Redelivered messages are absorbed by the unique `ingest_key` of `telemetry_raw`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from argus.registry import current_schema, current_tenant
from argus.sql import bigint_array, copy_rows
from assets.services import linked_devices
from devices.models import DeviceRole, DeviceStatus, ProcessingMode
from telemetry.adapters import ADAPTERS, Decoded, Rejected
from telemetry.chunks import chunks_admit, chunks_store
from telemetry.models import RawStatus
from telemetry.profiles import DEVICE_PROFILE_FIELDS, DeviceProfile, ProfileCache, TypeProfile

log = logging.getLogger(__name__)


@dataclass(slots=True)
class IncomingMessage:
    """One message as the bridge or the HTTP endpoint handed it to the stream."""

    key: str  # the stream message id (Nats-Msg-Id), unique per received message
    logical_id: str
    received_at: datetime
    payload: bytes
    transport: str = "mqtt"
    # Set when the bridge already refused the message (its device is over its rate limit, or an
    # oversized payload, forwarded cut short so that the device's tenant still gets its rejected
    # raw row): the reason it gave. It is stored as a rejected raw row without being decoded.
    refusal: str = ""


@dataclass(slots=True)
class Prepared:
    """A message on its way to storage: its device, decoded content and outcome."""

    message: IncomingMessage
    device: DeviceProfile | None
    device_type: TypeProfile | None
    decoded: Decoded | None = None
    status: str = RawStatus.ACCEPTED
    reason: str = ""
    # (device id, time, values) once children are resolved
    rows: list[tuple[int, datetime, dict[str, float]]] = field(default_factory=list)
    # Indexes (in decoded.readings) of gateway children refused one by one; the others are stored.
    refused: list[int] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.set_outcome(RawStatus.REJECTED, reason)

    def set_outcome(self, status: str, reason: str) -> None:
        self.status = status
        self.reason = safe_text(reason)
        self.rows = []

    @property
    def ingest_key(self) -> str:
        if self.decoded is not None and self.decoded.msg_id is not None:
            return f"{self.message.logical_id}/m/{self.decoded.msg_id}"
        return f"{self.message.logical_id}/n/{self.message.key}"


def safe_text(reason: str, limit: int = 1000) -> str:
    """A reason PostgreSQL can store: reasons quote device input, which may hold NUL characters
    (text refuses them) or, from a lenient decoder, lone surrogates (not encodable as UTF-8)."""
    text = reason[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass
class BatchResult:
    """What a batch did: outcomes per message and the newest values per device."""

    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    readings: int = 0
    children_registered: int = 0
    chunks: int = 0
    conflicts: int = 0
    # device id -> (time, {metric: value}) of its newest reading in this batch (after ingest_batch:
    # only of devices that feed an asset)
    latest: dict[int, tuple[datetime, dict[str, float]]] = field(default_factory=dict)
    completed_transactions: list[int] = field(default_factory=list)


STAGE_TABLES = """
CREATE TEMP TABLE IF NOT EXISTS ingest_raw_stage (
    device_id bigint, logical_identifier text, msg_id text, ingest_key text, payload bytea,
    received_at timestamptz, transport text, status text, reason text, readings integer
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS ingest_history_stage (
    time timestamptz, device_id bigint, metric text, value double precision, raw_id bigint
) ON COMMIT DELETE ROWS;
"""


def ingest_batch(*, messages: Sequence[IncomingMessage], profiles: ProfileCache) -> BatchResult:
    """Store one tenant's messages (call inside its schema_context); commits before returning."""
    schema = current_schema()
    now = timezone.now()
    prepared = [_prepare(m, schema, profiles, now) for m in messages]
    with transaction.atomic():
        registered = resolve_children(prepared, schema, profiles)
        admissions = chunks_admit([p for p in prepared if p.status == RawStatus.CHUNK])
        result, inserted = _write(prepared)
        # Only devices that feed an asset have alerts or scores to evaluate: without this, every
        # batch queued a Celery task, in line with the reassemblies, that found nothing to do.
        result.latest = {device_id: result.latest[device_id] for device_id in linked_devices(list(result.latest))}
        result.children_registered = len(registered)
        result.completed_transactions = chunks_store(admissions, inserted)
    # Only now are the new children real for other transactions too.
    for profile in registered:
        profiles.remember_device(schema, profile)
    return result


def ingest_refused(*, message: IncomingMessage, reason: str, profiles: ProfileCache) -> BatchResult:
    """Store one message as a rejected raw row with the given reason; commits before returning.

    For a message the database refused to store as it was: its exact bytes (a bytea, which
    refuses nothing) and the reason, so it is not redelivered until it is dead-lettered.
    """
    schema = current_schema()
    device = profiles.device(schema, message.logical_id)
    device_type = profiles.device_type(schema, device.device_type_id) if device else None
    # What the envelope said may itself be what was refused: fit it to the columns.
    stored = dataclasses.replace(
        message, key=safe_text(message.key, 200), logical_id=safe_text(message.logical_id, 128)
    )
    item = Prepared(message=stored, device=device, device_type=device_type)
    item.reject(reason)
    with transaction.atomic():
        result, _ = _write([item])
    result.latest = {}
    return result


def _prepare(message: IncomingMessage, schema: str, profiles: ProfileCache, now: datetime) -> Prepared:
    device = profiles.device(schema, message.logical_id)
    device_type = profiles.device_type(schema, device.device_type_id) if device else None
    item = Prepared(message=message, device=device, device_type=device_type)
    if device is None or device_type is None:
        item.reject("unknown device")
        return item
    if device.status != DeviceStatus.ACTIVE:
        item.reject(f"device is {device.status}")
        return item
    if message.refusal:
        item.reject(message.refusal)
        return item
    if len(message.payload) > settings.ARGUS_MAX_PAYLOAD_BYTES:
        item.reject(f"payload of {len(message.payload)} bytes exceeds {settings.ARGUS_MAX_PAYLOAD_BYTES}")
        return item
    try:
        decoded = ADAPTERS[device_type.protocol_adapter](
            message.payload, device_type.processing_mode, message.received_at, device_type.max_children
        )
        item.decoded = decoded
        if decoded.chunk is None:  # a chunk is checked as part of the whole, at reassembly
            error = device_type.schema_error(decoded.document)
            if error:
                raise Rejected(error)
            check_times(decoded, message.received_at)
    except Rejected as exc:
        item.reject(exc.reason)
        return item
    if decoded.chunk is not None:
        if decoded.chunk.total > device_type.max_chunks:
            item.reject(f"total {decoded.chunk.total} exceeds the type's limit of {device_type.max_chunks} chunks")
        else:
            # Stored for reassembly (telemetry.chunks); readings only once every chunk is in.
            item.status = RawStatus.CHUNK
        return item
    if device_type.processing_mode == ProcessingMode.ENDPOINT:
        item.rows = [(device.id, r.time, r.values) for r in decoded.readings]
    return item


def check_times(decoded: Decoded, received_at: datetime) -> None:
    """Refuse readings stamped too far from the time the platform received them."""
    earliest = received_at - timedelta(seconds=settings.ARGUS_MAX_PAST_SECONDS)
    latest = received_at + timedelta(seconds=settings.ARGUS_MAX_FUTURE_SECONDS)
    for reading in decoded.readings:
        if not earliest <= reading.time <= latest:
            raise Rejected(f"timestamp {reading.time.isoformat()} is too far from the receive time")


def resolve_children(prepared: list[Prepared], schema: str, profiles: ProfileCache) -> list[DeviceProfile]:
    """Map gateway children to device ids, registering unknown ones where the type allows.

    A child the gateway may not speak for (another tenant's device, another gateway's, or one
    not active) is refused on its own: its reading is left out and the raw row's reason names it,
    while the message's other children are stored. A message none of whose children can be stored
    is rejected.
    """
    gateway_items = [
        p
        for p in prepared
        if p.status == RawStatus.ACCEPTED
        and p.decoded is not None
        and p.decoded.readings[:1]
        and p.decoded.readings[0].child_id
    ]
    if not gateway_items:
        return []
    wanted = sorted({r.child_id for p in gateway_items for r in p.decoded.readings if r.child_id})  # type: ignore[union-attr]
    known = profiles.devices(schema, wanted)
    to_register: dict[str, Prepared] = {}
    for item in gateway_items:
        assert item.decoded is not None and item.device is not None and item.device_type is not None
        unknown = [r.child_id for r in item.decoded.readings if r.child_id not in known]
        if unknown and not item.device_type.auto_register_children:
            item.reject(f"unknown child device {unknown[0]} (automatic registration is off for this type)")
            continue
        for child_id in unknown:
            to_register.setdefault(child_id, item)  # type: ignore[arg-type]
    registered, foreign = _register_children(schema, to_register)
    known.update({p.logical_identifier: p for p in registered})
    for item in gateway_items:
        if item.status != RawStatus.ACCEPTED:
            continue
        assert item.decoded is not None and item.device is not None
        refusals: dict[str, str] = {}
        for index, reading in enumerate(item.decoded.readings):
            child_id = reading.child_id or ""
            child = known.get(child_id)
            if child is None:
                problem = "is owned by another tenant" if child_id in foreign else "could not be registered"
            elif child.parent_device_id != item.device.id:
                problem = "belongs to another gateway"
            elif child.status != DeviceStatus.ACTIVE:
                problem = f"is {child.status}"
            else:
                item.rows.append((child.id, reading.time, reading.values))
                continue
            item.refused.append(index)
            refusals.setdefault(child_id, problem)
        if refusals:
            listed = "; ".join(f"child device {c} {problem}" for c, problem in list(refusals.items())[:10])
            if len(refusals) > 10:
                listed += f"; and {len(refusals) - 10} more"
            if item.rows:
                item.reason = safe_text(f"{len(refusals)} of the children refused: {listed}")
            else:
                item.reject(listed)
    return registered


def _register_children(schema: str, to_register: dict[str, Prepared]) -> tuple[list[DeviceProfile], set[str]]:
    """Register unknown children under their gateways in the current transaction.

    Returns the profiles of the children now ours, and the ids another tenant owns. The claim is
    the insert into the public registry, whose unique logical identifier settles every race: of
    two transactions registering one id (two tenants' gateways, two ingest processes), the second
    waits for the first to commit, then finds the id taken. (Checking the registry first and
    writing it last let two tenants both create the device and store its readings.)
    """
    if not to_register:
        return [], set()
    tenant = current_tenant()
    with connection.cursor() as cursor:
        # In a fixed order, so two transactions claiming overlapping ids cannot deadlock.
        cursor.execute(
            """
            INSERT INTO public.device_registry (logical_identifier, tenant_id, device_id, created_at)
            SELECT l, %s, nextval(pg_get_serial_sequence('devices', 'id')), now()
            FROM unnest(%s::text[]) AS v(l) ORDER BY l
            ON CONFLICT (logical_identifier) DO NOTHING
            RETURNING logical_identifier, device_id
            """,
            [tenant.pk, sorted(to_register)],
        )
        claimed: dict[str, int] = dict(cursor.fetchall())
        others = [i for i in to_register if i not in claimed]
        foreign: set[str] = set()
        if others:
            cursor.execute(
                "SELECT logical_identifier FROM public.device_registry "
                "WHERE logical_identifier = ANY(%s) AND tenant_id <> %s",
                [others, tenant.pk],
            )
            foreign = {row[0] for row in cursor.fetchall()}
        if claimed:
            gateways = [to_register[i] for i in claimed]
            now = timezone.now()
            cursor.execute(
                """
                INSERT INTO devices (id, device_type_id, name, logical_identifier, device_role, parent_device_id,
                                     network_metadata, protocol, status, metadata, created_at, updated_at)
                SELECT i, t, l, l, %s, p, '{"auto_registered": true}'::jsonb, 'mqtt', 'active', '{}'::jsonb, %s, %s
                FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::bigint[]) AS v(i, t, l, p)
                ON CONFLICT (logical_identifier) DO NOTHING
                """,
                [
                    DeviceRole.CHILD,
                    now,
                    now,
                    list(claimed.values()),
                    [g.device_type.child_device_type_id or g.device_type.id for g in gateways],  # type: ignore[union-attr]
                    list(claimed),
                    [g.device.id for g in gateways],  # type: ignore[union-attr]
                ],
            )
        # Ours: claimed just now, or by another transaction of this tenant that committed while
        # our claim waited for it.
        mine = [i for i in to_register if i not in foreign]
        cursor.execute(
            f"SELECT {', '.join(DEVICE_PROFILE_FIELDS)} FROM devices WHERE logical_identifier = ANY(%s)", [mine]
        )
        profiles = [DeviceProfile(*row) for row in cursor.fetchall()]
        # A device row that existed without its registry row keeps its id; the registry follows it.
        moved = [(p.logical_identifier, p.id) for p in profiles if claimed.get(p.logical_identifier, p.id) != p.id]
        if moved:
            cursor.execute(
                "UPDATE public.device_registry r SET device_id = v.d FROM unnest(%s::text[], %s::bigint[]) AS v(l, d) "
                "WHERE r.logical_identifier = v.l AND r.tenant_id = %s",
                [[m[0] for m in moved], [m[1] for m in moved], tenant.pk],
            )
    log.info("children registered schema=%s count=%d refused=%d", schema, len(claimed), len(foreign))
    return profiles, foreign


def _write(prepared: list[Prepared]) -> tuple[BatchResult, dict[str, int]]:
    """Insert the batch's new raw rows, then the readings of the accepted ones; one transaction.

    Returns the outcome and the ids of the raw rows inserted (by ingest key).
    """
    result = BatchResult()
    unique: dict[str, Prepared] = {}
    for item in prepared:
        if item.ingest_key in unique:
            result.duplicates += 1
        else:
            unique[item.ingest_key] = item
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


def _insert_raw(unique: dict[str, Prepared]) -> dict[str, int]:
    """Insert the raw rows not stored before; ingest key -> raw id.

    The common case (nothing stored before) is one COPY straight into the table with ids taken
    from its sequence. A redelivered message makes that COPY fail on the unique ingest key;
    then, after rolling back to a savepoint, the batch goes through a staging table and
    `ON CONFLICT DO NOTHING`.
    """
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
            ON CONFLICT (ingest_key) DO NOTHING
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
            cursor.execute(
                "UPDATE assets SET last_telemetry_at = %s "
                "WHERE id IN (SELECT asset_id FROM asset_devices WHERE device_id = ANY(%s::bigint[])) "
                "AND (last_telemetry_at IS NULL OR last_telemetry_at < %s - make_interval(secs => %s))",
                [heard, id_array, heard, resolution / 2],
            )
