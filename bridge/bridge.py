"""The MQTT → NATS JetStream bridge behind `manage.py runbridge`.

paho-mqtt (MQTT 3.1.1 by default, persistent session, QoS 1, manual acknowledgement), driven by
the same asyncio loop (bridge/mqtt.py), appends each message to a deque. `step()` routes what
has arrived (device → tenant), packs each tenant's messages into envelopes (up to 500 messages
per JetStream message, see telemetry/jetstream.py), publishes them without awaiting each PubAck
(a bounded window of `publish_async` futures) and acknowledges the MQTT messages of an envelope
only once its PubAck has arrived. It holds at most `max_held` unacknowledged messages (twice the
publish window) and stops reading from the broker while it does, so a burst waits in the
broker's queue, not in this process. A publish that fails or gets no PubAck is published again with
the same message id, which JetStream's duplicate window absorbs. Nothing is acknowledged to the
broker that JetStream does not hold, so a crash of the bridge loses nothing: the broker
redelivers. Messages of unknown devices go to the dead-letter stream; a known device's oversized
payload goes to its tenant cut to the limit, and what a device sends over its rate limit travels
marked as refused: both are stored as rejected raw rows.

While the database is unavailable the bridge routes with the routes it last loaded, however old,
and keeps the messages of devices it has no route for (unacknowledged) until a lookup succeeds;
lookups are retried with backoff (argus/outage.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import ParseResult, urlparse

import nats
import orjson
import paho.mqtt.client as mqtt
from django.conf import settings
from django.db import close_old_connections, connection
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import Counter, Gauge

from argus.health import CheckResult, run_checks
from argus.outage import database_outage, is_database_error
from argus.registry import use_public_schema
from bridge.mqtt import AsyncioDriver, BufferedClient
from telemetry import jetstream as js_defs
from telemetry.health import connection_check

log = logging.getLogger(__name__)

TOPIC = "devices/+/telemetry"
# Presence (docs/ingestion.md): the device's "online" and its last will, retained.
STATUS_TOPIC = "devices/+/status"

# The broker's own counters ($SYS, republished every `sys_interval`, 10 s by default), exported as
# argus_broker_stat{stat=…}. A broker drops QoS 1 messages for an offline or slow subscriber once
# its queue limits are reached, and says so nowhere but here and in its log.
BROKER_STATS = {
    "$SYS/broker/publish/messages/dropped": "publish_messages_dropped",
    "$SYS/broker/store/messages/count": "store_messages",
    "$SYS/broker/store/messages/bytes": "store_bytes",
    "$SYS/broker/clients/connected": "clients_connected",
}
DROPPED_STAT = "publish_messages_dropped"

RECEIVED = Counter("argus_bridge_messages_received_total", "MQTT messages received")
FORWARDED = Counter("argus_bridge_messages_forwarded_total", "Messages stored in JetStream and acknowledged")
DEAD_LETTERED = Counter("argus_bridge_dead_lettered_total", "Messages sent to the dead-letter stream", ["reason"])
RATE_LIMITED = Counter("argus_bridge_rate_limited_total", "Messages over their device's rate limit, stored as rejected")
OVERSIZED = Counter("argus_bridge_oversized_total", "Oversized payloads of known devices, sent on to be rejected")
PUBLISH_RETRIES = Counter("argus_bridge_publish_retries_total", "JetStream publishes tried again")
INFLIGHT = Gauge("argus_bridge_inflight", "Messages published and awaiting their PubAck")
ROUTE_LOOKUPS = Counter("argus_bridge_route_lookups_total", "Device route lookups", ["source"])
ROUTE_CACHE_HITS = ROUTE_LOOKUPS.labels("cache")
BROKER_STAT = Gauge("argus_broker_stat", "The MQTT broker's own counters ($SYS topics)", ["stat"])
MQTT_CONNECTED = Gauge("argus_bridge_mqtt_connected", "1 while connected to the MQTT broker")
STATUS_RECEIVED = Counter(
    "argus_bridge_status_received_total", "Status messages (devices/<id>/status) by outcome", ["outcome"]
)
FEEDBACK = Counter(
    "argus_bridge_feedback_total",
    "Rejections to answer on devices/<id>/errors: published, or limited (over the device's rate) / dropped "
    "(not connected to the broker, or a malformed hand-over)",
    ["outcome"],
)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a device's messages go."""

    schema: str
    device_id: int


@dataclass(slots=True)
class Pending:
    """A JetStream publish (an envelope or a dead letter) between its MQTT messages' arrival and
    its PubAck; `acks` are the (mid, qos) of the MQTT messages to acknowledge then."""

    acks: list[tuple[int, int]]
    subject: str
    payload: bytes
    headers: dict[str, str]
    sent_at: float = 0.0
    attempts: int = 0
    failed: bool = False
    future: asyncio.Future[Any] | None = field(default=None, repr=False)


class DeviceRateLimit:
    """A token bucket per device: `rate` messages a second on average, `burst` at once.

    One device publishing flat out must not starve the others: what it sends over its limit is
    still taken from the broker (the broker has acknowledged it to the device, so it must end
    somewhere), but travels as a rejected message — its tenant gets a `telemetry_raw` row with
    the reason, and ingest spends no decoding, validation or readings on it.
    """

    def __init__(
        self, rate: float, burst: float, *, counter: Counter | None = None, what: str = "messages_rejected"
    ) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.reason = f"rate_limited: device over its limit of {rate:g} messages/s (burst {self.burst:g})"
        self._counter = counter if counter is not None else RATE_LIMITED
        self._what = what  # how the log line names what was limited
        self._buckets: dict[str, list[float]] = {}  # logical id -> [tokens, last refill]
        self._limited_since_log: dict[str, int] = {}

    def allow(self, logical_id: str, now: float) -> bool:
        """Take a token for one message of this device; False when it has none left."""
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(logical_id)
        if bucket is None:
            bucket = self._buckets[logical_id] = [self.burst, now]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True
        self._counter.inc()
        self._limited_since_log[logical_id] = self._limited_since_log.get(logical_id, 0) + 1
        return False

    def sweep(self, now: float) -> None:
        """Log who was limited since the last sweep; forget buckets that have refilled."""
        for logical_id, count in sorted(self._limited_since_log.items(), key=lambda kv: -kv[1])[:20]:
            log.warning("rate limit device=%s %s=%d", logical_id[:128], self._what, count)
        self._limited_since_log.clear()
        full_after = self.burst / self.rate if self.rate > 0 else 0.0
        for logical_id in [k for k, (_, last) in self._buckets.items() if now - last > full_after]:
            del self._buckets[logical_id]


class RouteCache:
    """logical id → Route, from the public registry; unknown ids are remembered briefly."""

    missing_ttl = 5.0

    def __init__(self) -> None:
        # Invalidation over Redis keeps routes fresh; the TTL bounds staleness should one be missed.
        self.ttl = settings.ARGUS_BRIDGE_ROUTE_TTL_SECONDS
        self._routes: dict[str, tuple[float, Route | None]] = {}

    def get(self, logical_id: str) -> tuple[bool, Route | None]:
        """(known to the cache, route or None)."""
        entry = self._routes.get(logical_id)
        if entry is not None and entry[0] > time.monotonic():
            ROUTE_CACHE_HITS.inc()
            return True, entry[1]
        return False, None

    def load(self, logical_ids: list[str] | None = None) -> dict[str, Route | None]:
        """Read routes from the registry (all of them, or the ids given) and return them.
        Database thread only."""
        close_old_connections()
        use_public_schema()
        query = (
            "SELECT r.logical_identifier, o.schema_name, r.device_id FROM public.device_registry r "
            "JOIN public.organizations o ON o.id = r.tenant_id"
        )
        params: list[Any] = []
        if logical_ids is not None:
            query += " WHERE r.logical_identifier = ANY(%s)"
            params = [logical_ids]
            ROUTE_LOOKUPS.labels("database").inc(len(logical_ids))
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            rows = cursor.fetchall()
        now = time.monotonic()
        loaded: dict[str, Route | None] = {}
        for logical_id, schema, device_id in rows:
            loaded[logical_id] = Route(schema=schema, device_id=device_id)
            # Spread expiry so a fleet loaded at once is not reloaded all in one batch.
            self._routes[logical_id] = (now + self.ttl * random.uniform(0.75, 1.0), loaded[logical_id])  # noqa: S311
        for logical_id in logical_ids or []:
            if logical_id not in loaded:
                loaded[logical_id] = None
                self._routes[logical_id] = (now + self.missing_ttl, None)
        return loaded

    def stale(self, logical_id: str) -> Route | None:
        """The route last loaded for this id, however old (None if there was none): what the
        bridge goes by while the registry cannot be read."""
        entry = self._routes.get(logical_id)
        return entry[1] if entry is not None else None

    def forget(self, logical_id: str) -> None:
        """Drop one route (its device changed)."""
        self._routes.pop(logical_id, None)

    def clear(self) -> None:
        """Drop every route."""
        self._routes.clear()

    def invalidate(self, kind: str, schema: str, key: str) -> None:
        """Apply a profile invalidation (see telemetry.profiles)."""
        if kind == "device":
            self.forget(key)


class MqttBridge:
    """Moves device messages from the MQTT broker into JetStream; `step()` forwards one batch."""

    batch = 2000
    # A PubAck this late means the publish (or its ack) was lost, e.g. across a NATS reconnect.
    publish_timeout = 30.0

    def __init__(
        self,
        *,
        mqtt_url: str | None = None,
        nats_url: str | None = None,
        client_id: str | None = None,
        share_group: str | None = None,
        max_inflight: int | None = None,
    ) -> None:
        self.mqtt_url = urlparse(mqtt_url or settings.MQTT_URL)
        self.nats_url = nats_url or settings.NATS_URL
        self.client_id = client_id or settings.ARGUS_BRIDGE_CLIENT_ID
        share_group = settings.ARGUS_BRIDGE_SHARE_GROUP if share_group is None else share_group
        self.topic = f"$share/{share_group}/{TOPIC}" if share_group else TOPIC
        self.status_topic = f"$share/{share_group}/{STATUS_TOPIC}" if share_group else STATUS_TOPIC
        self.max_inflight = max_inflight or settings.ARGUS_BRIDGE_MAX_INFLIGHT
        # The most unacknowledged MQTT messages this process holds (received, waiting or in flight
        # to JetStream) before it stops reading the broker's socket; reading resumes below half.
        # The broker's in-flight limit did not bound them: 30 s into a flat-out burst Mosquitto
        # 2.0.11 (max_inflight_messages 1000, MQTT 3.1.1) had sent 392,000 messages this process
        # had not acknowledged, and holding them took it to 1.5 GB (~2 KB each). The backlog
        # belongs in the broker's queue, which is bounded and sized for it.
        self.max_held = 2 * self.max_inflight
        # MQTT 3.1.1 by default: paho builds an MQTT 5 Properties object for every received
        # message, which measured as half of the bridge's CPU. Both keep a persistent session.
        self.protocol = mqtt.MQTTv5 if settings.ARGUS_BRIDGE_MQTT_PROTOCOL == "5" else mqtt.MQTTv311
        self.max_payload = settings.ARGUS_MAX_PAYLOAD_BYTES
        self.routes = RouteCache()
        self.rate_limit = DeviceRateLimit(settings.ARGUS_BRIDGE_DEVICE_RATE, settings.ARGUS_BRIDGE_DEVICE_BURST)
        # Answers on devices/<id>/errors: a device sending nothing but bad messages gets at most
        # this many, whatever it sends (no amplification).
        self.feedback_limit = DeviceRateLimit(
            settings.ARGUS_DEVICE_ERRORS_RATE,
            settings.ARGUS_DEVICE_ERRORS_BURST,
            counter=FEEDBACK.labels("limited"),
            what="errors_not_sent",
        )
        self._last_rate_sweep = time.monotonic()
        # The broker's dropped-message counter when last seen (None: not yet heard this run).
        self._broker_dropped: float | None = None
        self._incoming: deque[mqtt.MQTTMessage] = deque()
        # Messages of devices without a route while the database is unavailable, in arrival
        # order; routed again once a lookup is due (`_route_retry_at`).
        self._unrouted: deque[mqtt.MQTTMessage] = deque()
        self._route_retry_at = 0.0
        self.database = database_outage()
        # Publishes awaiting their PubAck (by message id), and how many MQTT messages they hold.
        self._inflight: dict[str, Pending] = {}
        self._inflight_messages = 0
        self._last_stamp = 0
        self._last_summary = time.monotonic()
        self._forwarded_since_summary = 0
        self.envelope_messages = settings.ARGUS_BRIDGE_ENVELOPE_MESSAGES
        self.envelope_bytes = settings.ARGUS_BRIDGE_ENVELOPE_BYTES
        self.linger = settings.ARGUS_BRIDGE_LINGER_SECONDS
        self._incoming_since = 0.0  # when the oldest message waiting in _incoming arrived
        self._draining = False
        self._nc: NATS | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._js: JetStreamContext | None = None
        self._client: BufferedClient | None = None
        self._driver: AsyncioDriver | None = None
        self._last_sweep = 0.0
        self.subscribed = asyncio.Event()
        # Read by /readyz from the probe server's thread.
        self.mqtt_connected = False

    # -- lifecycle --

    async def start(self) -> None:
        """Connect to NATS (streams declared), load routes, then connect to the broker."""
        self._loop = asyncio.get_running_loop()
        self._nc = await nats.connect(
            js_defs.nats_servers(self.nats_url),
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=self._nats_error,
        )
        # Our own window (max_inflight) bounds what is in flight; nats-py's must never make a
        # publish wait (its semaphore scans its waiters on every acquire).
        self._js = self._nc.jetstream(publish_async_max_pending=2 * self.max_inflight + 1000)
        await js_defs.ensure_streams(self._js)
        # One bridge of the queue group answers each rejection runingest hands over.
        await self._nc.subscribe(js_defs.FEEDBACK_SUBJECT, queue=js_defs.FEEDBACK_QUEUE, cb=self._on_feedback)
        try:
            await asyncio.to_thread(self.routes.load)
        except Exception as exc:
            if not is_database_error(exc):
                raise
            # Start anyway: routes are looked up again, per device, as messages arrive.
            self._route_retry_at = time.monotonic() + self.database.failed(exc)
        client = self._client = self._make_client()

        host = self.mqtt_url.hostname or "127.0.0.1"
        port = self.mqtt_url.port or (8883 if self.mqtt_url.scheme == "mqtts" else 1883)

        def connect() -> None:
            if self.protocol == mqtt.MQTTv5:
                client.connect(host, port, keepalive=30, clean_start=False, properties=self._connect_properties())
            else:
                client.connect(host, port, keepalive=30)

        self._driver = AsyncioDriver(client, connect)
        self._driver.start()

    async def close(self) -> None:
        """Stop taking messages, finish those in hand (publish + ack), then disconnect."""
        self._draining = True
        deadline = time.monotonic() + 30
        while (self._incoming or self._inflight or self._unrouted) and time.monotonic() < deadline:
            if not await self.step():
                await asyncio.sleep(0.01)
        if self._inflight or self._incoming or self._unrouted:
            log.warning(
                "bridge stopping with %d messages unacknowledged; the broker will redeliver them",
                len(self._inflight) + len(self._incoming) + len(self._unrouted),
            )
        if self._client is not None:
            # The PUBACKs go out before the DISCONNECT.
            self._client.loop_write()
            if self._driver is not None:
                await self._driver.stop()
        if self._nc is not None:
            await self._nc.drain()

    def readiness(self) -> list[CheckResult]:
        """/readyz of runbridge: connected to the MQTT broker and to NATS. The database is not
        asked: the bridge routes with the routes it last loaded while it is down."""
        return run_checks([self._mqtt_check, self._nats_check])

    def _mqtt_check(self) -> CheckResult:
        if not self.mqtt_connected:
            return CheckResult("mqtt", False, f"not connected to {redacted_url(self.mqtt_url)}")
        return CheckResult("mqtt", True)

    def _nats_check(self) -> CheckResult:
        return connection_check(self._nc, self._loop)

    # -- work --

    async def step(self) -> bool:
        """Route and publish what has arrived; retry failed publishes. False when idle."""
        await self._sweep()
        if self._driver is not None and self._driver.paused and self._held() <= self.max_held // 2:
            self._driver.resume_reading()
        room = min(self.batch, self.max_inflight - self._inflight_messages)
        filling = (
            len(self._incoming) < self.envelope_messages
            and time.monotonic() - self._incoming_since < self.linger
            and not self._draining
            # Reading is paused: nothing more arrives until this process forwards what it holds.
            and not (self._driver is not None and self._driver.paused)
        )
        unrouted_due = bool(self._unrouted) and time.monotonic() >= self._route_retry_at
        if ((not self._incoming or filling) and not unrouted_due) or room <= 0:
            # Idle, the window is full (leaving messages unacknowledged makes the broker wait),
            # or an envelope is still filling.
            await asyncio.sleep(0.002)
            return False
        batch: list[mqtt.MQTTMessage] = []
        if unrouted_due:
            # Held back during a database outage: they go first, keeping each device's order.
            batch.extend(self._unrouted)
            self._unrouted.clear()
        while self._incoming and len(batch) < room:
            batch.append(self._incoming.popleft())
        self._incoming_since = time.monotonic()
        # Resolve every route of the batch once: an entry must not expire between the check and
        # its use (it did, and valid devices were dead-lettered, when a batch straddled a TTL).
        routes: dict[str, Route | None] = {}
        missing = []
        for logical_id in map(_logical_id, batch):
            cached, route = self.routes.get(logical_id)
            if cached:
                routes[logical_id] = route
            else:
                missing.append(logical_id)
        if missing:
            loaded = await self._load_routes(sorted(set(missing)))
            if loaded is None:
                batch = self._route_stale(batch, missing, routes)
            else:
                routes.update(loaded)
        by_tenant: dict[str, list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]]] = {}
        limited: dict[str, list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]]] = {}
        statuses: dict[tuple[str, bool], list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]]] = {}
        now = time.monotonic()
        for message in batch:
            logical_id = _logical_id(message)
            route = routes[logical_id]
            received_us = self._receive_stamp()
            if message.topic.endswith("/status"):
                self._take_status(message, logical_id, received_us, route, now, statuses)
                continue
            refusal = self._refusal(logical_id, message.payload, route)
            if refusal is not None:
                await self._dead_letter(message, logical_id, received_us, *refusal)
                continue
            assert route is not None
            if len(message.payload) > self.max_payload:
                await self._forward_oversized(message, logical_id, received_us, route)
                continue
            record = js_defs.EnvelopeRecord(logical_id, js_defs.new_message_id(), received_us, message.payload)
            allowed = self.rate_limit.allow(logical_id, now)
            (by_tenant if allowed else limited).setdefault(route.schema, []).append((message, record))
        for schema, items in by_tenant.items():
            await self._send_envelopes(schema, items)
        for schema, items in limited.items():
            await self._send_envelopes(schema, items, refusal=self.rate_limit.reason)
        for (schema, retained), items in statuses.items():
            await self._send_envelopes(schema, items, status=True, retained=retained)
        return True

    def _take_status(
        self,
        message: mqtt.MQTTMessage,
        logical_id: str,
        received_us: int,
        route: Route | None,
        now: float,
        statuses: dict[tuple[str, bool], list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]]],
    ) -> None:
        """Queue a device's status message for its tenant's status envelope. A status is state,
        not a record: that of an unknown device, one over the device's rate limit (the same
        bucket as its telemetry) or an oversized one is acknowledged and dropped, and counted."""
        if route is None or len(message.payload) > self.max_payload or not self.rate_limit.allow(logical_id, now):
            outcome = "unknown_device" if route is None else "dropped"
            STATUS_RECEIVED.labels(outcome).inc()
            if message.qos > 0 and self._client is not None:
                self._client.ack(message.mid, message.qos)
            return
        STATUS_RECEIVED.labels("forwarded").inc()
        record = js_defs.EnvelopeRecord(logical_id, js_defs.new_message_id(), received_us, message.payload)
        statuses.setdefault((route.schema, bool(message.retain)), []).append((message, record))

    def _held(self) -> int:
        """Unacknowledged MQTT messages in this process."""
        return len(self._incoming) + len(self._unrouted) + self._inflight_messages

    async def _load_routes(self, logical_ids: list[str]) -> dict[str, Route | None] | None:
        """Look the routes up in the registry; None while the database is unavailable (and
        until the next try is due)."""
        if time.monotonic() < self._route_retry_at:
            return None
        try:
            loaded = await asyncio.to_thread(self.routes.load, logical_ids)
        except Exception as exc:
            if not is_database_error(exc):
                raise
            self._route_retry_at = time.monotonic() + self.database.failed(exc)
            return None
        self.database.recovered()
        return loaded

    def _route_stale(
        self, batch: list[mqtt.MQTTMessage], missing: list[str], routes: dict[str, Route | None]
    ) -> list[mqtt.MQTTMessage]:
        """Route `missing` by their last known routes; hold back (unacknowledged) the messages
        of devices that have none, and return the rest of the batch."""
        unrouted = set()
        for logical_id in missing:
            route = self.routes.stale(logical_id)
            if route is None:
                unrouted.add(logical_id)
            else:
                routes[logical_id] = route
        if not unrouted:
            return batch
        kept = []
        for message in batch:
            if _logical_id(message) in unrouted:
                self._unrouted.append(message)
            else:
                kept.append(message)
        return kept

    async def _send_envelopes(
        self,
        schema: str,
        items: list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]],
        *,
        refusal: str = "",
        status: bool = False,
        retained: bool = False,
    ) -> None:
        """Publish one tenant's messages in envelopes; with a refusal, every one of them is to be
        stored as rejected for that reason. Status messages go in envelopes of their own
        (`telemetry.<schema>.status`), marked when the broker replayed them as retained."""
        subject = js_defs.status_subject(schema) if status else js_defs.envelope_subject(schema)
        for envelope in _split(items, self.envelope_messages, self.envelope_bytes):
            payload = js_defs.encode_envelope([record for _, record in envelope])
            headers = {js_defs.H_MSG_ID: js_defs.new_message_id(), js_defs.H_ENVELOPE: str(len(envelope))}
            if refusal:
                headers[js_defs.H_REASON] = refusal
            if retained:
                headers[js_defs.H_RETAINED] = "1"
            acks = [(message.mid, message.qos) for message, _ in envelope]
            await self._send(Pending(acks=acks, subject=subject, payload=payload, headers=headers))

    def _receive_stamp(self) -> int:
        """The receive time in epoch microseconds, strictly increasing: it is the reading time of
        messages without `ts`, so two messages of one device must never share it."""
        stamp = max(js_defs.now_us(), self._last_stamp + 1)
        self._last_stamp = stamp
        return stamp

    def _refusal(self, logical_id: str, payload: bytes, route: Route | None) -> tuple[str, str] | None:
        """Why a message goes to the dead-letter stream instead of its tenant, or None.

        Only messages no tenant can be found for: a known device's oversized or non-UTF-8 payload
        is its tenant's to see, as a rejected raw row (`_forward_oversized`; ingest's adapters
        refuse non-UTF-8).
        """
        if route is None:
            return "unknown_device", f"no device {logical_id!r} on this platform"
        return None

    async def _forward_oversized(
        self, message: mqtt.MQTTMessage, logical_id: str, received_us: int, route: Route
    ) -> None:
        """An oversized payload of a known device goes to its tenant on its own, cut to the size
        limit (what JetStream and the raw table hold stays bounded), with the refusal in a header:
        ingest stores it as a rejected raw row with that reason."""
        headers = js_defs.telemetry_headers(logical_id=logical_id, received_ms=received_us / 1000, transport="mqtt")
        headers[js_defs.H_REASON] = (
            f"payload of {len(message.payload)} bytes exceeds {self.max_payload} "
            f"(only its first {self.max_payload} bytes are kept)"
        )
        OVERSIZED.inc()
        log.warning("oversized device=%s bytes=%d", logical_id, len(message.payload))
        pending = Pending(
            acks=[(message.mid, message.qos)],
            subject=js_defs.telemetry_subject(route.schema, route.device_id),
            payload=message.payload[: self.max_payload],
            headers=headers,
        )
        await self._send(pending)

    async def _dead_letter(
        self, message: mqtt.MQTTMessage, logical_id: str, received_us: int, code: str, reason: str
    ) -> None:
        headers = js_defs.telemetry_headers(logical_id=logical_id, received_ms=received_us / 1000, transport="mqtt")
        headers[js_defs.H_REASON] = reason
        headers["Argus-Topic"] = message.topic
        DEAD_LETTERED.labels(code).inc()
        log.warning("dead-letter code=%s device=%s bytes=%d", code, logical_id[:128], len(message.payload))
        pending = Pending(
            acks=[(message.mid, message.qos)],
            subject=js_defs.deadletter_subject(code),
            payload=message.payload,
            headers=headers,
        )
        await self._send(pending)

    async def _send(self, pending: Pending) -> None:
        self._inflight[pending.headers[js_defs.H_MSG_ID]] = pending
        self._inflight_messages += len(pending.acks)
        INFLIGHT.set(self._inflight_messages)
        await self._publish(pending)

    async def _publish(self, pending: Pending) -> None:
        assert self._js is not None
        pending.sent_at = time.monotonic()
        pending.attempts += 1
        pending.failed = False
        if self._nc is None or not self._nc.is_connected:
            # Not while NATS is away: the sweep publishes it again once it is back. (nats-py would
            # buffer it, or raise after taking a slot of its pending-publish window for good.)
            pending.failed = True
            return
        try:
            future = await self._js.publish_async(
                pending.subject, pending.payload, headers=pending.headers, wait_stall=self.publish_timeout
            )
        except Exception as exc:  # noqa: BLE001 - logged and retried by the sweep
            log.warning("publish failed, will retry subject=%s: %s", pending.subject, exc)
            pending.failed = True
            self._release_orphaned_publishes()
            return
        pending.future = future
        future.add_done_callback(functools.partial(self._published, pending))

    def _release_orphaned_publishes(self) -> None:
        """Free the window slots of publishes nats-py started but never sent.

        publish_async takes a slot of its pending-publish window and registers a future before it
        sends; when the send raises (the connection closed under it), that future is never
        resolved and the slot never returned, and once the window is used up every publish waits
        forever: the bridge wedged. Cancelling those futures returns their slots. (nats-py's
        private `_publish_async_futures`; the version is pinned in requirements.txt.)
        """
        assert self._js is not None
        ours = {id(p.future) for p in self._inflight.values() if p.future is not None}
        futures: dict[str, asyncio.Future[Any]] = getattr(self._js, "_publish_async_futures", {})
        for future in list(futures.values()):
            if id(future) not in ours and not future.done():
                future.cancel()

    def _published(self, pending: Pending, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            # Left in flight: the sweep republishes it with the same message id.
            if not future.cancelled():
                log.warning("publish not acknowledged subject=%s: %s", pending.subject, future.exception())
                pending.failed = True
            return
        key = pending.headers[js_defs.H_MSG_ID]
        if self._inflight.pop(key, None) is None:
            return
        self._inflight_messages -= len(pending.acks)
        INFLIGHT.set(self._inflight_messages)
        if self._client is not None:
            for mid, qos in pending.acks:
                if qos > 0:
                    self._client.ack(mid, qos)
        FORWARDED.inc(len(pending.acks))
        self._forwarded_since_summary += len(pending.acks)

    async def _sweep(self) -> None:
        """Once a second: publish again what failed or got no PubAck in time (same message id,
        so JetStream keeps one copy)."""
        now = time.monotonic()
        if now - self._last_sweep < 1.0:
            return
        self._last_sweep = now
        if now - self._last_rate_sweep >= 10:
            self._last_rate_sweep = now
            self.rate_limit.sweep(now)
            self.feedback_limit.sweep(now)
        if now - self._last_summary >= 30:
            # One line per half minute with what was done since the last one.
            self._last_summary = now
            log.info(
                "bridge progress forwarded=%d inflight=%d queued=%d reading_paused=%s",
                self._forwarded_since_summary,
                self._inflight_messages,
                len(self._incoming),
                self._driver is not None and self._driver.paused,
            )
            self._forwarded_since_summary = 0
        for pending in list(self._inflight.values()):
            if pending.failed or now - pending.sent_at > self.publish_timeout:
                if pending.future is not None and not pending.future.done():
                    pending.future.cancel()
                PUBLISH_RETRIES.inc()
                await self._publish(pending)

    # -- MQTT side (callbacks, on the event loop: bridge/mqtt.py drives paho) --

    def _make_client(self) -> BufferedClient:
        client = BufferedClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            # MQTT 3.1.1: a persistent session is clean_session=False (MQTT 5 sets it at connect).
            clean_session=False if self.protocol == mqtt.MQTTv311 else None,
            manual_ack=True,
        )
        if self.mqtt_url.scheme == "mqtts":
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.ARGUS_BRIDGE_CA)
            context.load_cert_chain(settings.ARGUS_BRIDGE_CERT, settings.ARGUS_BRIDGE_KEY)
            client.tls_set_context(context)
        if self.mqtt_url.username:
            client.username_pw_set(self.mqtt_url.username, self.mqtt_url.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _connect_properties(self) -> Properties:
        properties = Properties(PacketTypes.CONNECT)
        # Keep the session (and the broker's queue of messages for us) while we are away.
        properties.SessionExpiryInterval = settings.ARGUS_BRIDGE_SESSION_EXPIRY_SECONDS
        properties.ReceiveMaximum = min(self.max_inflight, 65535)
        return properties

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("mqtt connect refused: %s", reason)
            return
        MQTT_CONNECTED.set(1)
        self.mqtt_connected = True
        log.info("mqtt connected url=%s session_present=%s", redacted_url(self.mqtt_url), flags.session_present)
        # One SUBSCRIBE (one SUBACK): telemetry at QoS 1, the broker's counters at QoS 0. A broker
        # that refuses $SYS to the bridge (an ACL without `topic read $SYS/broker/#`) still gives
        # telemetry; the SUBACK's reasons say so in the log.
        client.subscribe([(self.topic, 1), (self.status_topic, 1), *((topic, 0) for topic in BROKER_STATS)])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        log.info("mqtt subscribed topic=%s reasons=%s", self.topic, [str(r) for r in reasons])
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        MQTT_CONNECTED.set(0)
        self.mqtt_connected = False
        if not self._draining:
            log.warning("mqtt disconnected: %s (reconnecting)", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Runs on the event loop's thread (bridge/mqtt.py drives paho).
        if message.topic.startswith("$SYS/"):
            self._broker_stat(message.topic, message.payload)
            return
        if self._draining:
            # Not acknowledged: the broker keeps it in our session and redelivers it.
            return
        RECEIVED.inc()
        if not self._incoming:
            self._incoming_since = time.monotonic()
        self._incoming.append(message)
        if self._driver is not None and self._held() >= self.max_held:
            self._driver.pause_reading()

    def _broker_stat(self, topic: str, payload: bytes) -> None:
        """Export one of the broker's counters; an ERROR when it has dropped messages."""
        stat = BROKER_STATS.get(topic)
        try:
            value = float(payload)
        except ValueError:
            return
        if stat is None:
            return
        BROKER_STAT.labels(stat).set(value)
        if stat != DROPPED_STAT:
            return
        previous, self._broker_dropped = self._broker_dropped, value
        # The first value heard may count drops from before this bridge started: they happened
        # while it was away, which is exactly when they matter.
        dropped = value - (previous or 0.0)
        if dropped > 0:
            log.error(
                "the MQTT broker dropped %d messages (%d since it started): acknowledged device messages "
                "it could not queue for a subscriber, e.g. this bridge while it was away. Raise the broker's "
                "max_queued_messages / max_queued_bytes (and max_inflight_messages): docker/mosquitto/mosquitto.conf "
                "has the settings Argus ships",
                dropped,
                value,
            )

    async def _on_feedback(self, msg: Any) -> None:
        """Answer a rejection runingest handed over on devices/<id>/errors (QoS 1, not retained),
        within the device's feedback rate; what is over it, or arrives while the broker is away,
        is counted and dropped (the rejected raw row has it all)."""
        try:
            body = orjson.loads(msg.data)
            logical_id = body["device"]
            answer = {"msg_id": body.get("msg_id"), "reason": body["reason"], "received_at": body.get("received_at")}
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            FEEDBACK.labels("dropped").inc()
            log.warning("feedback hand-over not understood: %s", exc)
            return
        if not isinstance(logical_id, str) or not logical_id or any(c in logical_id for c in "/+#"):
            FEEDBACK.labels("dropped").inc()
            return
        if not self.feedback_limit.allow(logical_id, time.monotonic()):
            return
        if self._client is None or not self.mqtt_connected:
            FEEDBACK.labels("dropped").inc()
            return
        self._client.publish(f"devices/{logical_id}/errors", orjson.dumps(answer), qos=1, retain=False)
        FEEDBACK.labels("published").inc()

    async def _nats_error(self, exc: Exception) -> None:
        log.warning("nats error: %s", exc)


def _split(
    items: list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]], max_messages: int, max_bytes: int
) -> list[list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]]]:
    """Cut one tenant's messages into envelopes of at most max_messages and about max_bytes."""
    envelopes: list[list[tuple[mqtt.MQTTMessage, js_defs.EnvelopeRecord]]] = [[]]
    size = 0
    for item in items:
        length = len(item[1].payload) + 64
        if envelopes[-1] and (len(envelopes[-1]) >= max_messages or size + length > max_bytes):
            envelopes.append([])
            size = 0
        envelopes[-1].append(item)
        size += length
    return envelopes


def redacted_url(url: ParseResult) -> str:
    """A URL fit for a log line: its password replaced by `***`."""
    if url.password is None:
        return url.geturl()
    netloc = url.netloc.rsplit("@", 1)[1]
    return url._replace(netloc=f"{url.username}:***@{netloc}").geturl()


def _logical_id(message: mqtt.MQTTMessage) -> str:
    # devices/<logical id>/telemetry or /status (the subscriptions guarantee the shape)
    return message.topic.split("/", 2)[1]
