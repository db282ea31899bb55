"""The ingest service: one tenant's batch of messages -> raw rows + readings, in one transaction.

Called by the JetStream consumer inside the tenant's schema. Bad input never raises: each
message ends as an accepted raw row with its readings, or a rejected raw row with its reason.
Redelivered messages are absorbed by the `ingest_key` of `telemetry_raw` (telemetry/storage.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction

from argus.registry import current_schema
from devices.models import DeviceStatus, ProcessingMode
from telemetry.adapters import ADAPTERS, Rejected, TimeWindow, check_times
from telemetry.children import resolve_children
from telemetry.chunks import chunks_admit, chunks_store
from telemetry.messages import KIND_STATUS, BatchResult, IncomingMessage, Prepared, safe_text
from telemetry.models import RawStatus
from telemetry.presence import presence_apply
from telemetry.profiles import ProfileCache
from telemetry.storage import write_prepared

log = logging.getLogger(__name__)


def ingest_batch(*, messages: Sequence[IncomingMessage], profiles: ProfileCache) -> BatchResult:
    """Store one tenant's messages (call inside its schema_context); commits before returning."""
    schema = current_schema()
    statuses = [m for m in messages if m.kind == KIND_STATUS]
    if statuses:
        messages = [m for m in messages if m.kind != KIND_STATUS]
    profiles.prefetch_devices(schema, [m.logical_id for m in messages])
    limits = _Limits(TimeWindow.from_settings(), settings.ARGUS_MAX_PAYLOAD_BYTES)
    prepared = [_prepare(m, schema, profiles, limits) for m in messages]
    with transaction.atomic():
        registered = resolve_children(prepared, schema, profiles)
        admissions = chunks_admit([p for p in prepared if p.status == RawStatus.CHUNK])
        result, inserted = write_prepared(prepared)
        result.children_registered = len(registered)
        result.completed_transactions = chunks_store(admissions, inserted)
        if statuses:
            result.presence = presence_apply(messages=statuses, profiles=profiles)
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
        result, _ = write_prepared([item])
    result.latest = {}
    return result


@dataclass(frozen=True, slots=True)
class _Limits:
    """The settings every message of a batch is checked against, read once per batch."""

    times: TimeWindow
    max_payload: int


def _prepare(message: IncomingMessage, schema: str, profiles: ProfileCache, limits: _Limits) -> Prepared:
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
    if len(message.payload) > limits.max_payload:
        item.reject(f"payload of {len(message.payload)} bytes exceeds {limits.max_payload}")
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
            check_times(decoded, message.received_at, limits.times)
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
