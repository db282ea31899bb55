"""Presence: what devices say on `devices/<id>/status` — their own "online" when they connect, and
the last will the broker publishes for them when their connection drops — stored as
`devices.online`, `presence_since` and `last_disconnect_reason` (docs/ingestion.md).

The bridge hands status messages through JetStream like telemetry (`telemetry.<schema>.status`
envelopes), so they are acknowledged to the broker only once JetStream holds them and survive a
database outage the same way; runingest writes them in the tenant's batch transaction. Several
ingest processes may store a device's statuses out of order: an update applies only when it was
received after the one stored, so the newest always wins. A retained status (the broker replays
every retained status whenever the bridge subscribes) carries no time of its own: it changes
the state only when it differs from the stored one, and never moves `presence_since` otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from django.db import connection
from prometheus_client import Counter

from argus.registry import current_schema
from telemetry.messages import IncomingMessage, Presence, safe_text
from telemetry.profiles import ProfileCache

log = logging.getLogger(__name__)

REASON_LENGTH = 200  # devices.last_disconnect_reason

UPDATES = Counter(
    "argus_presence_updates_total",
    "Status messages (devices/<id>/status) by outcome: applied, stale (an equal or newer state was stored), "
    "invalid, unknown_device",
    ["outcome"],
)


class InvalidStatus(ValueError):
    """A status payload that is neither `online`/`offline` nor the JSON object form."""


def parse_status(payload: bytes) -> tuple[bool, str]:
    """(online, reason) of a status payload: `{"state": "online"|"offline", "reason": "…"}`, or
    the bare words `online` / `offline`. InvalidStatus when it is neither."""
    text = payload.strip()
    if text in (b"online", b"offline"):
        return text == b"online", ""
    try:
        document: Any = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidStatus(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidStatus("a status must be a JSON object")
    state = document.get("state")
    if state not in ("online", "offline"):
        raise InvalidStatus('"state" must be "online" or "offline"')
    reason = document.get("reason", "")
    if not isinstance(reason, str):
        raise InvalidStatus('"reason" must be a string')
    return state == "online", safe_text(reason, REASON_LENGTH)


def presence_apply(*, messages: Sequence[IncomingMessage], profiles: ProfileCache) -> dict[int, Presence]:
    """Store the newest status of each device among `messages` (inside the tenant's schema and
    the caller's transaction); returns the presence of the devices it changed."""
    schema = current_schema()
    newest: dict[int, tuple[IncomingMessage, bool, str]] = {}
    for message in messages:
        try:
            online, reason = parse_status(message.payload)
        except InvalidStatus as exc:
            UPDATES.labels("invalid").inc()
            log.warning("status ignored device=%s: %s", message.logical_id, exc)
            continue
        device = profiles.device(schema, message.logical_id)
        if device is None:
            UPDATES.labels("unknown_device").inc()
            continue
        held = newest.get(device.id)
        if held is None or held[0].received_at < message.received_at:
            newest[device.id] = (message, online, reason)
    if not newest:
        return {}
    ids, states, times, reasons, retained = [], [], [], [], []
    for device_id, (message, online, reason) in newest.items():
        ids.append(device_id)
        states.append(online)
        times.append(message.received_at)
        reasons.append(reason)
        retained.append(message.retained)
    with connection.cursor() as cursor:
        # A device coming online keeps the reason it last went offline for.
        cursor.execute(
            "UPDATE devices AS d SET online = u.online, presence_since = u.since, "
            "last_disconnect_reason = CASE WHEN u.online THEN d.last_disconnect_reason ELSE u.reason END "
            "FROM unnest(%s::bigint[], %s::boolean[], %s::timestamptz[], %s::text[], %s::boolean[]) "
            "AS u(id, online, since, reason, retained) "
            "WHERE d.id = u.id AND (d.presence_since IS NULL OR d.presence_since < u.since) "
            "AND (NOT u.retained OR d.online IS DISTINCT FROM u.online) "
            "RETURNING d.id, d.online, d.presence_since, d.last_disconnect_reason",
            [ids, states, times, reasons, retained],
        )
        changed = {row[0]: Presence(online=row[1], since=row[2], last_disconnect_reason=row[3]) for row in cursor}
    UPDATES.labels("applied").inc(len(changed))
    UPDATES.labels("stale").inc(len(newest) - len(changed))
    return changed
