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

The streams, one per purpose (docs/scaling.md has the table):

- `TELEMETRY` (`telemetry.>`): every device message and chunk on its way to runingest; work queue
  (a message is gone once acknowledged), no age limit, `ARGUS_STREAM_MAX_BYTES`, discard new,
  duplicate window `ARGUS_STREAM_DUPLICATE_WINDOW_SECONDS`. Chunks of a chunked gateway travel
  here too, in their device's order: reassembly happens in PostgreSQL, not in a stream.
- `DEADLETTER` (`deadletter.>`): what cannot be routed or stored; limits retention,
  `ARGUS_DEADLETTER_MAX_AGE_DAYS`, `ARGUS_DEADLETTER_MAX_BYTES`, discard old (the oldest dead
  letter goes first), the same duplicate window.

Both keep `ARGUS_STREAM_REPLICAS` copies (1 on one node, 3 in a cluster); the consumer inherits
the stream's. In a cluster a publish is acknowledged once a majority of the replicas hold it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import nats
import nats.errors
from django.conf import settings
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, ServiceUnavailableError

T = TypeVar("T")

log = logging.getLogger(__name__)

TELEMETRY_STREAM = "TELEMETRY"
DEADLETTER_STREAM = "DEADLETTER"
INGEST_CONSUMER = "ingest"

# Headers every telemetry message carries (the payload stays the device's exact bytes).
H_MSG_ID = "Nats-Msg-Id"
H_DEVICE = "Argus-Device"
H_RECEIVED = "Argus-Received-Ms"
H_TRANSPORT = "Argus-Transport"
H_REASON = "Argus-Reason"
H_ENVELOPE = "Argus-Envelope"
# On a status envelope (`status_subject`): its messages reached the bridge as retained messages,
# replayed by the broker on subscribing, so when they were sent is not known.
H_RETAINED = "Argus-Retained"

# Rejections to be answered on devices/<id>/errors (docs/ingestion.md): runingest publishes one
# core NATS message per rejection after its commit, the bridges (one queue group: one of them
# takes each) publish it to the device, rate-limited. Best effort: core NATS, not a stream.
FEEDBACK_SUBJECT = "argus.feedback"
FEEDBACK_QUEUE = "bridges"

# An envelope carries many device messages of one tenant in one JetStream message (see
# `encode_envelope`): the bridge sends them, the consumer opens them. Per the prototype's
# measurements this lifts the chain's ceiling and cuts NATS and consumer CPU several times.
ENVELOPE_VERSION = b"AE1"
_RECORD = struct.Struct("!HHqI")


@dataclass(frozen=True, slots=True)
class EnvelopeRecord:
    """One device message inside an envelope."""

    logical_id: str
    key: str  # the message's own id (what Nats-Msg-Id is for a single message)
    received_us: int  # epoch microseconds: exact, unlike a float of milliseconds
    payload: bytes


def encode_envelope(records: list[EnvelopeRecord]) -> bytes:
    """Pack messages: version, then per message a fixed header and its id, key and exact bytes."""
    parts = [ENVELOPE_VERSION]
    for record in records:
        logical_id = record.logical_id.encode()
        key = record.key.encode()
        parts.append(_RECORD.pack(len(logical_id), len(key), record.received_us, len(record.payload)))
        parts += (logical_id, key, record.payload)
    return b"".join(parts)


def decode_envelope(data: bytes) -> list[EnvelopeRecord]:
    """The messages of an envelope; ValueError when it is not one."""
    if not data.startswith(ENVELOPE_VERSION):
        raise ValueError("not an Argus envelope (version marker missing)")
    records = []
    view = memoryview(data)
    offset = len(ENVELOPE_VERSION)
    while offset < len(data):
        if offset + _RECORD.size > len(data):
            raise ValueError("truncated envelope record header")
        id_len, key_len, received_us, payload_len = _RECORD.unpack_from(data, offset)
        offset += _RECORD.size
        end = offset + id_len + key_len + payload_len
        if end > len(data):
            raise ValueError("truncated envelope record")
        logical_id = bytes(view[offset : offset + id_len]).decode()
        key = bytes(view[offset + id_len : offset + id_len + key_len]).decode()
        records.append(EnvelopeRecord(logical_id, key, received_us, bytes(view[offset + id_len + key_len : end])))
        offset = end
    return records


def envelope_subject(schema: str) -> str:
    """`telemetry.<tenant schema>.envelope`: many devices of one tenant."""
    return f"telemetry.{schema}.envelope"


def status_subject(schema: str) -> str:
    """`telemetry.<tenant schema>.status`: an envelope of devices' presence messages
    (devices/<id>/status), stored by runingest as the devices' presence, not as telemetry."""
    return f"telemetry.{schema}.status"


@dataclass(frozen=True)
class StreamSettings:
    """Limits of the pipeline's streams (from settings, so tests can shrink them)."""

    telemetry_max_bytes: int
    deadletter_max_bytes: int
    deadletter_max_age_s: float
    duplicate_window_s: float
    max_deliver: int
    ack_wait_s: float
    max_ack_pending: int
    replicas: int = 1


def nats_servers(url: str | None = None) -> list[str]:
    """The servers of a NATS_URL: one URL, or several comma-separated (a cluster's)."""
    servers = [part.strip() for part in (url or settings.NATS_URL).split(",") if part.strip()]
    if not servers:
        raise ValueError("NATS_URL names no server")
    return servers


def stream_settings() -> StreamSettings:
    """The stream limits configured for this deployment."""
    return StreamSettings(
        telemetry_max_bytes=settings.ARGUS_STREAM_MAX_BYTES,
        deadletter_max_bytes=settings.ARGUS_DEADLETTER_MAX_BYTES,
        deadletter_max_age_s=settings.ARGUS_DEADLETTER_MAX_AGE_DAYS * 24 * 3600.0,
        duplicate_window_s=settings.ARGUS_STREAM_DUPLICATE_WINDOW_SECONDS,
        max_deliver=settings.ARGUS_INGEST_MAX_DELIVER,
        ack_wait_s=settings.ARGUS_INGEST_ACK_WAIT_SECONDS,
        max_ack_pending=settings.ARGUS_INGEST_MAX_ACK_PENDING,
        replicas=settings.ARGUS_STREAM_REPLICAS,
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


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_epoch_us(us: int) -> datetime:
    """An aware datetime from epoch microseconds, exactly."""
    return EPOCH + timedelta(microseconds=us)


def from_epoch_ms(ms: float) -> datetime:
    """An aware datetime from epoch milliseconds given to the microsecond (a header value).

    Integer arithmetic: `datetime.fromtimestamp(ms / 1000)` rounds epoch seconds through a float,
    which cannot hold 16 significant digits, and two stamps 1 us apart could become one.
    """
    return from_epoch_us(round(ms * 1000))


def now_us() -> int:
    """Wall-clock epoch microseconds."""
    return time.time_ns() // 1000


def now_ms() -> float:
    """Wall-clock epoch milliseconds, to the microsecond (the receive time stamped on each
    message; it is the reading time of messages without `ts`, so two messages of one device
    must not share it)."""
    return time.time_ns() / 1_000_000


# How long start-up keeps declaring the streams while JetStream does not answer in time. In a
# cluster the requests go to the meta leader: during an election, or under load, one times out
# (a restarted runbridge exited on such a timeout in the `bridge-kill-one-of-two` fault).
ENSURE_STREAMS_PATIENCE_S = 60.0
# (Not "no responders": that is a server without JetStream, which waiting does not mend.)
_JETSTREAM_BUSY = (nats.errors.TimeoutError, ServiceUnavailableError)


async def ensure_streams(
    js: JetStreamContext, limits: StreamSettings | None = None, *, patience: float = ENSURE_STREAMS_PATIENCE_S
) -> None:
    """Create or update the streams and the ingest consumer (idempotent), trying again for up to
    `patience` seconds while JetStream times out or is unavailable (no leader yet)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            await _ensure_streams(js, limits or stream_settings())
            return
        except _JETSTREAM_BUSY as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("declaring the streams: JetStream did not answer (%r); trying again", exc)
            await asyncio.sleep(1.0)


async def _ensure_streams(js: JetStreamContext, limits: StreamSettings) -> None:
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
            num_replicas=limits.replicas,
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
            max_age=limits.deadletter_max_age_s,
            duplicate_window=limits.duplicate_window_s,
            num_replicas=limits.replicas,
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
        # Creating an existing durable consumer updates its editable settings (ack wait, max
        # deliveries, max ack pending) on the nats-server versions we run.
        await js.add_consumer(TELEMETRY_STREAM, consumer)
    except BadRequestError as exc:
        # A change the server cannot apply in place: keep working with the consumer as it is.
        log.warning("ingest consumer kept its existing configuration: %s", exc)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


class SyncPublisher:
    """A JetStream publisher for synchronous code (HTTP views): one event loop in a daemon
    thread owns the NATS connection; `publish` waits for the PubAck.

    Every call is bounded by its timeout, whatever state NATS is in: the first connect is
    cancelled when the timeout runs out (nats-py would otherwise retry it forever), one connect
    attempt runs at a time and concurrent callers share it, and a connection that nats-py gave up
    reconnecting is replaced on the next call. So while NATS is down a request fails (503) within
    about the timeout, and the first request after NATS is back connects again.
    """

    # After a connection was up, nats-py retries this many times, this far apart, before it
    # closes the connection; the next publish then connects afresh. Keeping it short matters
    # more than riding out a long outage here: each HTTP request waits at most its timeout anyway.
    reconnect_attempts = 2
    reconnect_wait_s = 0.5

    def __init__(self, url: str | None = None) -> None:
        self.url = url or settings.NATS_URL
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jetstream-publisher", daemon=True)
        self._thread.start()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._connecting: concurrent.futures.Future[tuple[NATS, JetStreamContext]] | None = None
        self._closed = False
        # Guards the fields above; never held while waiting on NATS.
        self._lock = threading.Lock()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            # Leave nothing running in the loop after the caller has given up.
            future.cancel()
            raise

    async def _open(self, timeout: float) -> tuple[NATS, JetStreamContext]:
        """Connect and declare the streams, all within `timeout`; close what was opened on failure."""
        nc = NATS()

        async def connect() -> JetStreamContext:
            await nc.connect(
                nats_servers(self.url),
                connect_timeout=max(1, math.ceil(timeout)),
                reconnect_time_wait=self.reconnect_wait_s,  # type: ignore[arg-type]  # nats-py annotates int, takes float
                max_reconnect_attempts=self.reconnect_attempts,
                error_cb=self._nats_error,
            )
            js = nc.jetstream()
            await ensure_streams(js)
            return js

        try:
            return nc, await asyncio.wait_for(connect(), timeout)
        except BaseException:
            await nc.close()
            raise

    async def _nats_error(self, exc: Exception) -> None:
        log.debug("nats error url=%s: %r", self.url, exc)

    def _jetstream(self, timeout: float) -> JetStreamContext:
        """The connected JetStream context; connects (or waits for the connect in progress) if needed."""
        with self._lock:
            if self._closed:
                raise nats.errors.ConnectionClosedError
            if self._nc is not None and self._nc.is_closed:
                # nats-py ran out of reconnect attempts: start over.
                self._nc = self._js = None
            if self._js is not None:
                return self._js
            if self._connecting is None:
                self._connecting = asyncio.run_coroutine_threadsafe(self._open(timeout), self._loop)
                self._connecting.add_done_callback(self._connected)
            connecting = self._connecting
        # Shared by every caller, so not cancelled when one of them gives up; _open bounds it.
        try:
            return connecting.result(timeout)[1]
        except concurrent.futures.CancelledError:
            raise nats.errors.ConnectionClosedError from None  # close() ran meanwhile

    def _connected(self, future: concurrent.futures.Future[tuple[NATS, JetStreamContext]]) -> None:
        with self._lock:
            self._connecting = None
            if future.cancelled():
                return
            exc = future.exception()
            if exc is not None:
                log.warning("cannot connect to NATS at %s: %r", self.url, exc)
                return
            nc, js = future.result()
            if not self._closed:
                self._nc, self._js = nc, js
                return
        # close() ran while this connect was finishing.
        asyncio.run_coroutine_threadsafe(nc.close(), self._loop)

    def publish(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float = 5.0) -> int:
        """Publish and wait for the PubAck; returns the stream sequence.

        Raises nats.errors.Error, TimeoutError or OSError when NATS cannot be reached or does not
        acknowledge; the call takes at most about `timeout` seconds in every case.
        """
        started = time.monotonic()
        js = self._jetstream(timeout)
        remaining = max(0.1, timeout - (time.monotonic() - started))
        ack = self._run(js.publish(subject, payload, headers=headers, timeout=remaining), remaining + 0.5)
        return int(ack.seq)

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection and stop the event loop thread; publish raises afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
        try:
            self._run(self._shutdown(), timeout)
        except TimeoutError:
            log.warning("closing the NATS connection to %s took over %.0f s; abandoning it", self.url, timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    async def _shutdown(self) -> None:
        """Close the connection (a cancelled connect closes its own), then end every task left."""
        with self._lock:
            nc, self._nc, self._js = self._nc, None, None
        try:
            if nc is not None and not nc.is_closed:
                await nc.close()
        except (nats.errors.Error, OSError) as exc:
            # Closing while nats-py is reconnecting fails on the flush of the dead socket.
            log.info("closing the NATS connection to %s: %r", self.url, exc)
        finally:
            current = asyncio.current_task()
            leftovers = [task for task in asyncio.all_tasks() if task is not current]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
