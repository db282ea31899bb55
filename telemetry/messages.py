"""The ingest vocabulary: a message as it arrives from the stream, a message on its way to
storage with its outcome, and what a batch did. Shared by the ingest workflow
(telemetry/ingest.py), the child resolution (telemetry/children.py), the writer
(telemetry/storage.py) and the reassembly of chunked transactions (telemetry/chunks.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from telemetry.adapters import Decoded
from telemetry.models import RawStatus
from telemetry.profiles import DeviceProfile, TypeProfile

LatestValues = dict[int, tuple[datetime, dict[str, float]]]

# What a stream message carries: telemetry, or a device's presence (devices/<id>/status).
KIND_TELEMETRY = "telemetry"
KIND_STATUS = "status"


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
    kind: str = KIND_TELEMETRY
    # A status message the broker replayed (retained) when the bridge subscribed.
    retained: bool = False


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
        """What makes a message the same message however often it is delivered: its `msg_id`;
        without one, when every reading carries the device's own time, the exact bytes (a
        redelivery after a bridge restart has a new stream id but the same bytes); otherwise
        (readings stamped with the receive time) this delivery's stream id."""
        if self.decoded is not None:
            if self.decoded.msg_id is not None:
                return f"{self.message.logical_id}/m/{self.decoded.msg_id}"
            received_at = self.message.received_at
            # The receive time is unique per message: a reading that has it took no time of its own.
            if self.decoded.readings and all(r.time != received_at for r in self.decoded.readings):
                digest = hashlib.blake2b(self.message.payload, digest_size=16).hexdigest()
                return f"{self.message.logical_id}/b/{digest}"
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


@dataclass(frozen=True, slots=True)
class Feedback:
    """A rejection to tell the device on devices/<id>/errors."""

    logical_id: str
    msg_id: str | None
    reason: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Presence:
    """A device's connectivity as stored: online or not, since when, why it last went offline."""

    online: bool
    since: datetime
    last_disconnect_reason: str


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
    # device id -> (time, {metric: value}) of its newest reading in this batch
    latest: LatestValues = field(default_factory=dict)
    completed_transactions: list[int] = field(default_factory=list)
    # Rejections of devices whose type opts in to feedback (only MQTT: HTTP answers with a 400).
    feedback: list[Feedback] = field(default_factory=list)
    # device id -> its presence, where this batch changed it
    presence: dict[int, Presence] = field(default_factory=dict)

    def merge(self, other: BatchResult) -> None:
        """Add another result's counts and newest values to this one."""
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.duplicates += other.duplicates
        self.readings += other.readings
        self.children_registered += other.children_registered
        self.chunks += other.chunks
        self.conflicts += other.conflicts
        self.completed_transactions.extend(other.completed_transactions)
        self.latest.update(other.latest)
        self.feedback.extend(other.feedback)
        self.presence.update(other.presence)
