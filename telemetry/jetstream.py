"""JetStream streams, subjects and headers of the pipeline, declared in code.

Streams are created or updated idempotently by every process that publishes or consumes, at
start-up. Telemetry uses work-queue retention with `discard new`: when the store is full a
publish fails (the bridge then leaves the MQTT message unacknowledged, the HTTP endpoint answers
503) instead of silently dropping old, unprocessed messages.

Durability: JetStream acknowledges a publish once the message is in the server's file store,
before fsync (`sync_interval` defaults to 2 minutes). That survives a crash of nats-server or of
any Argus process; it does not survive losing the machine's power within the sync interval. Our
shipped `docker/nats/nats.conf` sets `sync_interval: 1s` to bound that window; set it to
`always` where a power loss must not lose one acknowledged message (at a throughput cost).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from django.conf import settings
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

T = TypeVar("T")

TELEMETRY_STREAM = "TELEMETRY"
DEADLETTER_STREAM = "DEADLETTER"
INGEST_CONSUMER = "ingest"

# Headers every telemetry message carries (the payload stays the device's exact bytes).
H_MSG_ID = "Nats-Msg-Id"
H_DEVICE = "Argus-Device"
H_RECEIVED = "Argus-Received-Ms"
H_TRANSPORT = "Argus-Transport"
H_REASON = "Argus-Reason"
H_TENANT = "Argus-Tenant"


@dataclass(frozen=True)
class StreamSettings:
    """Limits of the pipeline's streams (from settings, so tests can shrink them)."""

    telemetry_max_bytes: int
    deadletter_max_bytes: int
    duplicate_window_s: float
    max_deliver: int
    ack_wait_s: float
    max_ack_pending: int


def stream_settings() -> StreamSettings:
    """The stream limits configured for this deployment."""
    return StreamSettings(
        telemetry_max_bytes=settings.ARGUS_STREAM_MAX_BYTES,
        deadletter_max_bytes=settings.ARGUS_DEADLETTER_MAX_BYTES,
        duplicate_window_s=120.0,
        max_deliver=settings.ARGUS_INGEST_MAX_DELIVER,
        ack_wait_s=settings.ARGUS_INGEST_ACK_WAIT_SECONDS,
        max_ack_pending=settings.ARGUS_INGEST_MAX_ACK_PENDING,
    )


# Message ids: unique per process start (random prefix) and per message (counter). Cheaper
# than a uuid4 per message, which reads the OS random source each time.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_message_id() -> str:
    """A unique id for one received message (its JetStream Nats-Msg-Id)."""
    return f"{_ID_PREFIX}-{next(_ID_COUNTER)}"


def telemetry_subject(schema: str, device_id: int) -> str:
    """`telemetry.<tenant schema>.<device id>`: tenant and device, as NATS-safe tokens."""
    return f"telemetry.{schema}.{device_id}"


def deadletter_subject(reason_code: str) -> str:
    """`deadletter.<reason code>`."""
    return f"deadletter.{reason_code}"


def telemetry_headers(
    *, logical_id: str, received_ms: float, transport: str, msg_id: str | None = None
) -> dict[str, str]:
    """Headers of a telemetry message; the message id makes a retried publish a no-op."""
    return {
        H_MSG_ID: msg_id or new_message_id(),
        H_DEVICE: logical_id,
        H_RECEIVED: f"{received_ms:.3f}",
        H_TRANSPORT: transport,
    }


def now_ms() -> float:
    """Wall-clock epoch milliseconds, to the microsecond (the receive time stamped on each
    message; it is the reading time of messages without `ts`, so two messages of one device
    must not share it)."""
    return time.time_ns() / 1_000_000


async def ensure_streams(js: JetStreamContext, limits: StreamSettings | None = None) -> None:
    """Create or update the streams and the ingest consumer (idempotent)."""
    limits = limits or stream_settings()
    await _ensure_stream(
        js,
        StreamConfig(
            name=TELEMETRY_STREAM,
            subjects=["telemetry.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_bytes=limits.telemetry_max_bytes,
            duplicate_window=limits.duplicate_window_s,
        ),
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=DEADLETTER_STREAM,
            subjects=["deadletter.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_bytes=limits.deadletter_max_bytes,
            max_age=30 * 24 * 3600.0,
        ),
    )
    consumer = ConsumerConfig(
        durable_name=INGEST_CONSUMER,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=limits.ack_wait_s,
        # One more than we allow: on its last delivery the consumer dead-letters a message
        # before processing it, so even a message that crashes the process ends somewhere.
        max_deliver=limits.max_deliver + 1,
        max_ack_pending=limits.max_ack_pending,
        max_waiting=512,
    )
    try:
        await js.add_consumer(TELEMETRY_STREAM, consumer)
    except BadRequestError:
        # Exists with other settings: bring it in line.
        await js.add_consumer(TELEMETRY_STREAM, consumer)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


class SyncPublisher:
    """A JetStream publisher for synchronous code (HTTP views): one event loop in a daemon
    thread owns the NATS connection; `publish` waits for the PubAck."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or settings.NATS_URL
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jetstream-publisher", daemon=True)
        self._thread.start()
        self._js: JetStreamContext | None = None
        self._lock = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _connect(self, timeout: float) -> JetStreamContext:
        with self._lock:
            if self._js is None:

                async def connect() -> JetStreamContext:
                    nc = await nats.connect(self.url, connect_timeout=timeout, max_reconnect_attempts=-1)
                    js = nc.jetstream()
                    await ensure_streams(js)
                    return js

                self._js = self._run(connect(), timeout * 2)
            return self._js

    def publish(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float = 5.0) -> int:
        """Publish and wait for the PubAck; returns the stream sequence. Raises on failure."""
        js = self._connect(timeout)
        ack = self._run(js.publish(subject, payload, headers=headers, timeout=timeout), timeout + 1)
        return int(ack.seq)
