"""The pipeline's units of work called directly, in this process, against the real services.

The bridge's `step()` against a private Mosquitto and nats-server, the consumer's `handle()`
against a private nats-server and the test database, and `ingest_batch` on every kind of input it
refuses. tests/test_pipeline.py runs the same code end to end, as processes; these say which unit
broke when one of those fails, and what exactly each unit hands on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import django.db
import nats
import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from django.conf import settings
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from pytest_django.fixtures import SettingsWrapper

from argus.outage import SERVICE_UP, Outage, is_database_error
from bridge.bridge import DeviceRateLimit, MqttBridge
from bridge.mqtt import AsyncioDriver, BufferedClient
from devices.models import Device, DeviceStatus, DeviceType, ProcessingMode, ProtocolAdapter
from devtools.services import ServerHandle
from telemetry.consumer import IngestConsumer, StepOutcome
from telemetry.ingest import ingest_batch
from telemetry.jetstream import (
    DEADLETTER_STREAM,
    H_DEVICE,
    H_ENVELOPE,
    H_MSG_ID,
    H_REASON,
    INGEST_CONSUMER,
    TELEMETRY_STREAM,
    EnvelopeRecord,
    decode_envelope,
    encode_envelope,
    ensure_streams,
    envelope_subject,
    from_epoch_us,
    new_message_id,
    now_us,
)
from telemetry.messages import BatchResult, IncomingMessage
from telemetry.models import RawStatus, TelemetryHistory, TelemetryRaw
from telemetry.profiles import ProfileCache
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import publisher

NOW_MS = lambda: int(time.time() * 1000)  # noqa: E731


def endpoint_type(**overrides: Any) -> DeviceType:
    """An endpoint type whose schema bounds the temperature (so a schema violation is easy); no
    root `type`, so the list shape passes it too."""
    values: dict[str, Any] = {
        "metrics": ["temperature", "humidity"],
        "message_schema": {
            "properties": {
                "values": {
                    "type": "object",
                    "properties": {"temperature": {"type": "number", "minimum": -60, "maximum": 120}},
                }
            },
        },
    }
    values.update(overrides)
    return make_device_type(**values)


# --- The bridge: MqttBridge.step() ----------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A message read back from a stream."""

    subject: str
    headers: dict[str, str]
    data: bytes


class Streams:
    """What reached JetStream: TELEMETRY through the durable ingest consumer (a work-queue stream
    allows no second unfiltered consumer), acknowledged so that later tests do not see it, and
    DEADLETTER through an ephemeral consumer."""

    def __init__(
        self, nc: NATS, telemetry: JetStreamContext.PullSubscription, deadletter: JetStreamContext.PullSubscription
    ) -> None:
        self._nc = nc
        self._subscriptions = (telemetry, deadletter)
        self.telemetry: list[Received] = []
        self.deadletter: list[Received] = []

    @classmethod
    async def open(cls, nats_url: str) -> Streams:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await ensure_streams(js)
        telemetry = await js.pull_subscribe_bind(durable=INGEST_CONSUMER, stream=TELEMETRY_STREAM)
        deadletter = await js.pull_subscribe("deadletter.>", stream=DEADLETTER_STREAM)
        return cls(nc, telemetry, deadletter)

    async def poll(self) -> None:
        """Take what has arrived in either stream."""
        for subscription, into in zip(self._subscriptions, (self.telemetry, self.deadletter), strict=True):
            try:
                msgs = await subscription.fetch(100, timeout=0.2)
            except TimeoutError:
                # nats-py's TimeoutError or asyncio's (see tests/test_pipeline.py): nothing more.
                continue
            for msg in msgs:
                into.append(Received(msg.subject, dict(msg.headers or {}), msg.data))
                await msg.ack()

    def envelopes_of(self, logical_id: str) -> list[tuple[Received, list[EnvelopeRecord]]]:
        """The envelopes holding messages of this device, with their records."""
        found = []
        for message in self.telemetry:
            if H_ENVELOPE in message.headers:
                records = decode_envelope(message.data)
                if any(record.logical_id == logical_id for record in records):
                    found.append((message, records))
        return found

    def dead_letters_of(self, logical_id: str) -> list[Received]:
        return [m for m in self.deadletter if m.headers.get(H_DEVICE) == logical_id]

    async def close(self) -> None:
        await self._nc.flush()  # the acks
        await self._nc.close()


async def started_bridge(broker: ServerHandle, nats_server: ServerHandle, batch: int) -> MqttBridge:
    """A bridge subscribed to the private broker that forwards the next `batch` messages in one
    step: step() takes nothing until that many have arrived (or 10 s passed), so what the tests
    assert does not depend on how the broker's deliveries fall between steps."""
    # The bridge loads routes with asyncio.to_thread: on one thread of ours, whose database
    # connection `close_database_thread` closes (else the test database cannot be dropped).
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    bridge = MqttBridge(
        mqtt_url=f"mqtt://127.0.0.1:{broker.port}", nats_url=nats_server.url, client_id=unique_id("unit-bridge")
    )
    bridge.envelope_messages = batch
    bridge.linger = 10.0
    await bridge.start()
    await asyncio.wait_for(bridge.subscribed.wait(), timeout=30)
    return bridge


async def close_database_thread(executor: ThreadPoolExecutor | None = None) -> None:
    """Close the database connection of a worker thread (None: the loop's default executor)."""
    await asyncio.get_running_loop().run_in_executor(executor, connections.close_all)


async def publish(mqtt_url: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish (QoS 1, each acknowledged by the broker) from a device-side client; in a thread,
    so that the bridge's event loop keeps reading meanwhile."""

    def send_all() -> None:
        with publisher(mqtt_url) as device:
            for logical_id, payload in messages:
                device.send(logical_id, payload)

    await asyncio.to_thread(send_all)


async def step_until(bridge: MqttBridge, streams: Streams, done: Callable[[], bool], timeout: float = 30) -> None:
    """Call step() until what the streams received satisfies `done`."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; telemetry={streams.telemetry} deadletter={streams.deadletter}")
        await bridge.step()
        await streams.poll()


def test_it_forwards_a_known_device_in_one_envelope_and_dead_letters_an_unknown_one(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    known = device.logical_identifier
    unknown = unique_id("NO-SUCH-DEVICE")
    payloads = [orjson.dumps({"msg_id": f"m-{i}", "values": {"temperature": 20 + i}}) for i in range(3)]
    stranger = b'{"values": {"temperature": 1}}'

    async def scenario() -> None:
        bridge = await started_bridge(broker, nats_server, batch=len(payloads) + 1)
        streams = await Streams.open(nats_server.url)
        try:
            assert await bridge.step() is False  # nothing has arrived
            await publish(f"mqtt://127.0.0.1:{broker.port}", [(known, p) for p in payloads] + [(unknown, stranger)])
            await step_until(
                bridge,
                streams,
                lambda: bool(streams.envelopes_of(known)) and bool(streams.dead_letters_of(unknown)),
            )
            await asyncio.sleep(0.3)
            await streams.poll()
            assert await bridge.step() is False  # all forwarded: idle again

            [(envelope, records)] = streams.envelopes_of(known)
            assert envelope.subject == envelope_subject(alpha.schema)
            assert envelope.headers[H_ENVELOPE] == "3"
            assert H_REASON not in envelope.headers
            assert [r.logical_id for r in records] == [known] * 3
            assert [r.payload for r in records] == payloads  # the device's exact bytes, in order
            assert len({r.key for r in records}) == 3
            stamps = [r.received_us for r in records]
            assert stamps == sorted(set(stamps))  # strictly increasing: a message without ts keeps its own time
            assert abs(stamps[0] - now_us()) < 60_000_000

            [dead] = streams.dead_letters_of(unknown)
            assert dead.subject == "deadletter.unknown_device"
            assert dead.data == stranger
            assert f"no device {unknown!r}" in dead.headers[H_REASON]
            assert dead.headers["Argus-Topic"] == f"devices/{unknown}/telemetry"
            assert all(record.logical_id != unknown for m in streams.telemetry for record in decode_envelope(m.data))
        finally:
            await streams.close()
            await bridge.close()
            await close_database_thread()

    asyncio.run(scenario())


def test_it_sends_what_a_device_sends_over_its_rate_limit_as_refused(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    logical_id = device.logical_identifier
    payloads = [orjson.dumps({"msg_id": f"burst-{i}", "values": {"temperature": i}}) for i in range(5)]

    async def scenario() -> None:
        bridge = await started_bridge(broker, nats_server, batch=len(payloads))
        limit = bridge.rate_limit = DeviceRateLimit(rate=1, burst=2)
        streams = await Streams.open(nats_server.url)
        try:
            await publish(f"mqtt://127.0.0.1:{broker.port}", [(logical_id, p) for p in payloads])
            await step_until(
                bridge, streams, lambda: sum(len(r) for _, r in streams.envelopes_of(logical_id)) >= len(payloads)
            )
            envelopes = streams.envelopes_of(logical_id)
            allowed = [records for message, records in envelopes if H_REASON not in message.headers]
            refused = [(message, records) for message, records in envelopes if H_REASON in message.headers]
            # One step, one instant: the burst's two tokens, then nothing.
            assert [[r.payload for r in records] for records in allowed] == [payloads[:2]]
            [(message, records)] = refused
            assert [r.payload for r in records] == payloads[2:]
            assert message.headers[H_REASON] == limit.reason
            assert message.headers[H_REASON].startswith("rate_limited: ")
            assert message.headers[H_ENVELOPE] == "3"
            assert message.subject == envelope_subject(alpha.schema)
        finally:
            await streams.close()
            await bridge.close()
            await close_database_thread()

    asyncio.run(scenario())


def test_it_stops_reading_the_broker_while_it_holds_its_window_of_unacknowledged_messages(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    logical_id = device.logical_identifier
    # 60 messages of 20 KB: 1.2 MB, several of the driver's 256 KB reads.
    payloads = [
        orjson.dumps({"msg_id": f"w-{i}", "values": {"temperature": i}, "pad": "x" * 20_000}) for i in range(60)
    ]

    async def scenario() -> None:
        bridge = await started_bridge(broker, nats_server, batch=len(payloads))
        bridge.max_inflight, bridge.max_held = 2, 4
        streams = await Streams.open(nats_server.url)
        try:
            # No step(): nothing is forwarded, so the window fills and reading stops; the broker keeps the rest.
            await publish(f"mqtt://127.0.0.1:{broker.port}", [(logical_id, p) for p in payloads])
            await asyncio.sleep(1.0)
            assert bridge._driver is not None and bridge._driver.paused
            # The window, plus what was left of the read in hand when it filled (at most 256 KB).
            assert bridge.max_held <= len(bridge._incoming) <= bridge.max_held + 14
            await step_until(
                bridge, streams, lambda: sum(len(r) for _, r in streams.envelopes_of(logical_id)) >= len(payloads)
            )
            records = [record for _, rs in streams.envelopes_of(logical_id) for record in rs]
            assert [r.payload for r in records] == payloads  # all of them, once, in order
        finally:
            await streams.close()
            await bridge.close()
            await close_database_thread()

    asyncio.run(scenario())


def _in_packet(command: int, packet: bytes) -> Any:
    """paho's state of a packet it has read whole."""
    return {
        "command": command,
        "have_remaining": 1,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(packet),
        "packet": packet,
        "to_process": 0,
        "pos": 0,
    }


def test_it_parses_a_received_publish_as_paho_would() -> None:
    received: list[mqtt.MQTTMessage] = []
    client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id=unique_id("parse"), manual_ack=True)
    client.on_message = lambda c, userdata, message: received.append(message)
    topic = "devices/dev-ü/telemetry".encode()
    packets = [
        (0x32, len(topic).to_bytes(2, "big") + topic + (513).to_bytes(2, "big") + b'{"v":1}'),  # QoS 1
        (0x39, len(topic).to_bytes(2, "big") + topic + b"\x00\x07"),  # QoS 0, dup and retain set
    ]
    for command, packet in packets:
        client._in_packet = _in_packet(command, packet)
        assert client._handle_publish() == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
    first, second = received
    assert (first.topic, first.payload, first.qos, first.mid, first.dup, first.retain) == (
        "devices/dev-ü/telemetry",
        b'{"v":1}',
        1,
        513,
        False,
        False,
    )
    assert (second.topic, second.payload, second.qos, second.mid, second.dup, second.retain) == (
        "devices/dev-ü/telemetry",
        b"\x00\x07",
        0,
        0,
        True,
        True,
    )
    assert not client._out_packet  # manual acknowledgement: nothing sent for either
    # A topic that is not UTF-8 takes paho's own path (its message raises when the topic is read).
    client._in_packet = _in_packet(0x30, b"\x00\x02\xff\xfeX")
    client._handle_publish()
    with pytest.raises(UnicodeDecodeError):
        _ = received[-1].topic


def test_it_keeps_the_broker_connection_while_reading_is_paused(broker: ServerHandle) -> None:
    async def scenario() -> None:
        client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2, client_id=unique_id("paused"))

        def connect() -> None:
            client.connect("127.0.0.1", broker.port, keepalive=1)

        driver = AsyncioDriver(client, connect)
        driver.start()
        try:
            deadline = time.monotonic() + 10
            while not client.is_connected():
                assert time.monotonic() < deadline, "never connected"
                await asyncio.sleep(0.05)
            driver.pause_reading()
            # Several keepalive periods without reading a PINGRESP: paho would call it a dead link.
            await asyncio.sleep(4.5)
            assert client.is_connected() and client.socket() is not None
            driver.resume_reading()
            await asyncio.sleep(0.5)
            assert client.is_connected()
        finally:
            await driver.stop()

    asyncio.run(scenario())


# --- The consumer: IngestConsumer.handle() ----------------------------------------------------------


async def settled(js: JetStreamContext, timeout: float = 10) -> ConsumerInfo:
    """The ingest consumer's info once nothing is delivered and unacknowledged (an ack is a plain
    publish, applied by the server a moment after it is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(TELEMETRY_STREAM, INGEST_CONSUMER)
        if info.num_ack_pending == 0 or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.05)


async def drain(subscription: JetStreamContext.PullSubscription) -> None:
    """Acknowledge whatever is waiting."""
    while True:
        try:
            msgs = await subscription.fetch(100, timeout=0.2)
        except TimeoutError:
            return
        for msg in msgs:
            await msg.ack()


def test_it_stores_an_envelope_acknowledges_it_and_absorbs_its_redelivery(
    nats_server: ServerHandle, live_db: None, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    logical_id = device.logical_identifier
    ts = NOW_MS() - 1000
    payloads = [orjson.dumps({"msg_id": f"e-{i}", "ts": ts + i, "values": {"temperature": 10 + i}}) for i in range(3)]
    start_us = now_us()
    records = [EnvelopeRecord(logical_id, new_message_id(), start_us + i, p) for i, p in enumerate(payloads)]
    committed: list[tuple[str, BatchResult]] = []

    async def deliver(js: JetStreamContext, consumer: IngestConsumer) -> tuple[StepOutcome, ConsumerInfo]:
        subscription = await js.pull_subscribe_bind(durable=INGEST_CONSUMER, stream=TELEMETRY_STREAM)
        await drain(subscription)  # what an earlier test of the module may have left
        # As the bridge sends it (bridge/bridge.py `_send_envelopes`).
        headers = {H_MSG_ID: new_message_id(), H_ENVELOPE: str(len(records))}
        await js.publish(envelope_subject(alpha.schema), encode_envelope(records), headers=headers)
        msgs = await subscription.fetch(10, timeout=10)
        outcome = await consumer.handle(msgs)
        return outcome, await settled(js)

    async def scenario() -> tuple[StepOutcome, ConsumerInfo, StepOutcome, ConsumerInfo]:
        # As runingest builds it, with a recording hook instead of Celery's follow-ups.
        consumer = IngestConsumer(
            nats_url=nats_server.url, after_commit=lambda schema, result: committed.append((schema, result))
        )
        await consumer.start()
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            first, first_info = await deliver(js, consumer)
            # The same messages again (a bridge that republished after a lost PubAck, in a new envelope).
            again, again_info = await deliver(js, consumer)
            return first, first_info, again, again_info
        finally:
            await nc.close()
            # Its database thread keeps its connection, as in runingest until the process exits.
            await close_database_thread(consumer._db)
            await consumer.close()

    first, first_info, again, again_info = asyncio.run(scenario())

    assert (first.fetched, first.acked, first.retried, first.dead_lettered) == (1, 1, 0, 0)
    result = first.results[alpha.schema]
    assert (result.accepted, result.rejected, result.duplicates, result.readings) == (3, 0, 0, 3)
    assert first_info.num_ack_pending == 0 and first_info.num_pending == 0
    assert (again.fetched, again.acked) == (1, 1)
    repeated = again.results[alpha.schema]
    assert (repeated.accepted, repeated.duplicates, repeated.readings) == (0, 3, 0)
    assert again_info.num_ack_pending == 0 and again_info.num_pending == 0
    assert [(schema, r.accepted) for schema, r in committed] == [(alpha.schema, 3), (alpha.schema, 0)]

    with schema_context(alpha.schema):
        rows = list(TelemetryRaw.objects.filter(logical_identifier=logical_id).order_by("id"))
        assert [bytes(r.payload) for r in rows] == payloads
        assert [r.msg_id for r in rows] == ["e-0", "e-1", "e-2"]
        assert all(r.status == RawStatus.ACCEPTED and r.readings == 1 and r.device_id == device.pk for r in rows)
        assert [r.received_at for r in rows] == [from_epoch_us(start_us + i) for i in range(3)]
        values = sorted(TelemetryHistory.objects.filter(device_id=device.pk).values_list("metric", "value", "raw_id"))
        assert values == [("temperature", 10.0 + i, rows[i].pk) for i in range(3)]


# --- The ingest service: ingest_batch on everything it refuses ---------------------------------------


@dataclass(frozen=True)
class Case:
    """One message of the batch and the raw row it must become."""

    logical_id: str
    payload: bytes
    status: str
    reason: str  # a part of the stored reason; "" for none at all
    readings: int = 0
    refusal: str = ""


def rejected(logical_id: str, payload: bytes | Any, reason: str, **extra: Any) -> Case:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return Case(logical_id, body, RawStatus.REJECTED, reason, **extra)


def accepted(logical_id: str, payload: Any, readings: int, reason: str = "") -> Case:
    return Case(logical_id, orjson.dumps(payload), RawStatus.ACCEPTED, reason, readings)


@dataclass
class Fleet:
    """The devices of the rejection batch, in tenant alpha."""

    endpoint: Device
    flat: Device
    disabled: Device
    strict_gateway: Device  # no automatic registration, at most two children
    gateway: Device  # registers unknown children
    own_child: Device
    disabled_child: Device
    other_gateways_child: Device
    beta_device: Device
    chunked: Device
    other_chunked: Device


def make_fleet(alpha: TenantPersona, beta: TenantPersona) -> Fleet:
    with schema_context(beta.schema):
        beta_device = make_device(endpoint_type())
    with schema_context(alpha.schema):
        endpoints = endpoint_type()
        strict = make_device_type(processing_mode=ProcessingMode.GATEWAY, metrics=["rssi"], max_children=2)
        registering = make_device_type(
            processing_mode=ProcessingMode.GATEWAY, metrics=["rssi"], auto_register_children=True
        )
        chunked = make_device_type(
            processing_mode=ProcessingMode.GATEWAY_CHUNKED, metrics=["rssi"], auto_register_children=True, max_chunks=4
        )
        gateway = make_device(registering, device_role="gateway")
        other_gateway = make_device(registering, device_role="gateway")
        return Fleet(
            endpoint=make_device(endpoints),
            flat=make_device(
                make_device_type(protocol_adapter=ProtocolAdapter.FLAT_JSON, metrics=["temperature"], message_schema={})
            ),
            disabled=make_device(endpoints, status=DeviceStatus.DISABLED),
            strict_gateway=make_device(strict, device_role="gateway"),
            gateway=gateway,
            own_child=make_device(registering, device_role="child", parent_device=gateway),
            disabled_child=make_device(
                registering, device_role="child", parent_device=gateway, status=DeviceStatus.DISABLED
            ),
            other_gateways_child=make_device(registering, device_role="child", parent_device=other_gateway),
            beta_device=beta_device,
            chunked=make_device(chunked, device_role="gateway"),
            other_chunked=make_device(chunked, device_role="gateway"),
        )


def rejection_cases(fleet: Fleet) -> tuple[list[Case], str]:
    """One message per reason the ingest service gives (docs/ingestion.md), and accepted ones
    beside them; also the id of the child the batch registers."""
    ts = NOW_MS() - 60_000
    dev = fleet.endpoint.logical_identifier
    strict = fleet.strict_gateway.logical_identifier
    gw = fleet.gateway.logical_identifier
    own = fleet.own_child.logical_identifier
    chunked = fleet.chunked.logical_identifier
    new_child = unique_id("BEACON")
    tx = unique_id("tx")
    stranger = unique_id("STRANGER")
    oversized = b'{"msg_id": "big", "values": {"temperature": 1}, "pad": "' + b"x" * settings.ARGUS_MAX_PAYLOAD_BYTES
    cases = [
        # An endpoint device: accepted in both shapes, then each way a message can be malformed.
        accepted(dev, {"msg_id": "ok-1", "ts": ts, "values": {"temperature": 21.5, "humidity": 40}}, readings=2),
        accepted(
            dev,
            [{"ts": ts - 2, "values": {"temperature": 20}}, {"ts": ts - 1, "values": {"humidity": 41}}],
            readings=2,
        ),
        rejected(dev, b'{"values": {"temperature": 21', "malformed JSON"),
        rejected(dev, b'{"msg_id": "nan", "values": {"temperature": NaN}}', "malformed JSON"),
        rejected(dev, b'{"msg_id": "inf", "values": {"temperature": Infinity}}', "malformed JSON"),
        rejected(dev, b'{"msg_id": "huge", "values": {"temperature": 1e400}}', "malformed JSON"),
        rejected(dev, b'{"msg_id": "surrogate", "values": {"\\ud800": 1}}', "malformed JSON"),
        rejected(dev, b"\xff\xfe not utf-8", "payload is not valid UTF-8"),
        rejected(dev, oversized, f"payload of {len(oversized)} bytes exceeds {settings.ARGUS_MAX_PAYLOAD_BYTES}"),
        rejected(dev, {"msg_id": "hot", "values": {"temperature": 500}}, "schema: values/temperature: "),
        rejected(dev, {"msg_id": "future", "ts": NOW_MS() + 10 * 86_400_000, "values": {"temperature": 1}}, "too far"),
        rejected(dev, {"msg_id": "past", "ts": 0, "values": {"temperature": 1}}, "too far from the receive time"),
        rejected(dev, {"msg_id": "words", "ts": "yesterday", "values": {"temperature": 1}}, "is not RFC 3339"),
        rejected(dev, {"msg_id": "naive", "ts": "2026-01-01T00:00:00", "values": {"temperature": 1}}, "no time zone"),
        rejected(dev, {"msg_id": "far", "ts": 1e300, "values": {"temperature": 1}}, "is out of range"),
        rejected(dev, {"msg_id": "bool-ts", "ts": True, "values": {"temperature": 1}}, "ts must be epoch milliseconds"),
        rejected(dev, {"msg_id": "string", "values": {"temperature": "hot"}}, "values.temperature is not a number"),
        rejected(dev, {"msg_id": "bool", "values": {"temperature": True}}, "values.temperature is not a number"),
        rejected(dev, {"msg_id": "none"}, "values must be a non-empty object"),
        rejected(dev, {"msg_id": "empty", "values": {}}, "values must be a non-empty object"),
        rejected(dev, {"msg_id": "long", "values": {"m" * 65: 1}}, "metric name longer than 64 characters"),
        rejected(dev, {"msg_id": "nul-metric", "values": {"a\x00b": 1}}, "metric name contains a NUL character"),
        rejected(dev, {"msg_id": "nul\x00", "values": {"temperature": 1}}, "msg_id contains a NUL character"),
        rejected(dev, {"msg_id": "", "values": {"temperature": 1}}, "msg_id must be a non-empty string"),
        rejected(dev, {"msg_id": 2**60, "values": {"temperature": 1}}, "an integer msg_id must be at most"),
        rejected(dev, [], "empty list of readings"),
        rejected(dev, [1], "must be an object with values"),
        rejected(dev, 42, "message must be an object with values"),
        # What the bridge refused (a device over its rate limit) is stored as it says, undecoded.
        rejected(
            dev,
            {"msg_id": "limited", "values": {"temperature": 1}},
            "rate_limited: over the limit",
            refusal="rate_limited: over the limit",
        ),
        # Whose message it is.
        rejected(unique_id("NO-SUCH-DEVICE"), {"values": {"temperature": 1}}, "unknown device"),
        rejected(fleet.disabled.logical_identifier, {"values": {"temperature": 1}}, "device is disabled"),
        # The flat adapter.
        accepted(fleet.flat.logical_identifier, {"msg_id": "flat", "ts": ts, "temperature": 19.5}, readings=1),
        rejected(fleet.flat.logical_identifier, [1], "message must be a JSON object of metric: number"),
        # Gateways: the shape, then each child the gateway may not speak for.
        rejected(strict, [{"id": "X"}], "a gateway message must be a JSON object"),
        rejected(strict, {"msg_id": "no-children"}, "children must be a non-empty list"),
        rejected(strict, {"msg_id": "scalar", "children": [1]}, "children[0] must be an object"),
        rejected(strict, {"msg_id": "no-id", "children": [{"values": {"rssi": 1}}]}, "children[0].id must be"),
        rejected(
            strict, {"msg_id": "bad-id", "children": [{"id": "a/b", "values": {"rssi": 1}}]}, "is not a valid device id"
        ),
        rejected(
            strict,
            {"msg_id": "many", "children": [{"id": f"C{i}", "values": {"rssi": i}} for i in range(3)]},
            "3 children, more than the type's limit of 2",
        ),
        rejected(
            strict,
            {"msg_id": "stranger", "children": [{"id": stranger, "values": {"rssi": -50}}]},
            f"unknown child device {stranger} (automatic registration is off for this type)",
        ),
        accepted(
            gw,
            {
                "msg_id": "g-ok",
                "ts": ts,
                "children": [{"id": own, "values": {"rssi": -60}}, {"id": new_child, "values": {"rssi": -61}}],
            },
            readings=2,
        ),
        rejected(
            gw,
            {"msg_id": "g-beta", "children": [{"id": fleet.beta_device.logical_identifier, "values": {"rssi": 1}}]},
            f"child device {fleet.beta_device.logical_identifier} is owned by another tenant",
        ),
        rejected(
            gw,
            {"msg_id": "g-no-values", "children": [{"id": own, "values": {}}]},
            "children[0].values must be a non-empty object",
        ),
        rejected(
            gw,
            {
                "msg_id": "g-other",
                "children": [{"id": fleet.other_gateways_child.logical_identifier, "values": {"rssi": 1}}],
            },
            f"child device {fleet.other_gateways_child.logical_identifier} belongs to another gateway",
        ),
        accepted(
            gw,
            {
                "msg_id": "g-partly",
                "ts": ts + 1,
                "children": [
                    {"id": own, "values": {"rssi": -62}},
                    {"id": fleet.disabled_child.logical_identifier, "values": {"rssi": -63}},
                ],
            },
            readings=1,
            reason=f"1 of the children refused: child device {fleet.disabled_child.logical_identifier} is disabled",
        ),
        # Chunked gateways: a chunk is kept for reassembly; its header is checked on arrival.
        Case(
            chunked,
            orjson.dumps(
                {
                    "msg_id": "c-0",
                    "transaction_id": tx,
                    "chunk": 0,
                    "total": 2,
                    "children": [{"id": "B1", "values": {"rssi": 1}}],
                }
            ),
            RawStatus.CHUNK,
            "",
        ),
        Case(
            chunked,
            orjson.dumps({"msg_id": "c-0-again", "transaction_id": tx, "chunk": 0, "total": 2, "children": [1]}),
            RawStatus.IGNORED,
            f"chunk 0 of {tx} was already received",
        ),
        rejected(
            chunked,
            {"msg_id": "c-1", "transaction_id": tx, "chunk": 1, "total": 3, "children": [1]},
            "total 3 disagrees with 2 of the transaction's earlier chunks",
        ),
        rejected(
            fleet.other_chunked.logical_identifier,
            {"msg_id": "c-theirs", "transaction_id": tx, "chunk": 1, "total": 2, "children": [1]},
            f"transaction_id {tx} belongs to another device",
        ),
        rejected(
            chunked,
            {"msg_id": "c-big", "transaction_id": unique_id("tx"), "chunk": 0, "total": 5, "children": [1]},
            "total 5 exceeds the type's limit of 4 chunks",
        ),
        rejected(
            chunked,
            {"msg_id": "c-out", "transaction_id": unique_id("tx"), "chunk": 2, "total": 2, "children": [1]},
            "chunk must be an integer in 0..1",
        ),
        rejected(
            chunked,
            {"msg_id": "c-zero", "transaction_id": unique_id("tx"), "chunk": 0, "total": 0, "children": [1]},
            "total must be a positive integer",
        ),
        rejected(
            chunked,
            {"msg_id": "c-nul", "transaction_id": "tx\x00", "chunk": 0, "total": 1, "children": [1]},
            "transaction_id contains a NUL character",
        ),
        rejected(
            chunked,
            {"msg_id": "c-none", "chunk": 0, "total": 1, "children": [1]},
            "transaction_id must be a non-empty string",
        ),
        rejected(
            chunked,
            {"msg_id": "c-empty", "transaction_id": unique_id("tx"), "chunk": 0, "total": 1, "children": []},
            "children must be a non-empty list",
        ),
    ]
    return cases, new_child


def incoming(cases: list[Case]) -> Iterator[IncomingMessage]:
    start = timezone.now()
    for i, case in enumerate(cases):
        yield IncomingMessage(
            key=new_message_id(),
            logical_id=case.logical_id,
            received_at=start + timedelta(microseconds=i),
            payload=case.payload,
            refusal=case.refusal,
        )


def test_it_stores_every_refused_message_as_a_rejected_row_with_its_reason(
    db: None, alpha: TenantPersona, beta: TenantPersona
) -> None:
    fleet = make_fleet(alpha, beta)
    cases, new_child = rejection_cases(fleet)
    dev = fleet.endpoint.logical_identifier
    # A second message with a msg_id already in the batch: stored once (the first).
    repeat = Case(dev, orjson.dumps({"msg_id": "ok-1", "values": {"temperature": 99}}), RawStatus.ACCEPTED, "")
    with schema_context(alpha.schema):
        result = ingest_batch(messages=list(incoming([*cases, repeat])), profiles=ProfileCache())
        logical_ids = {case.logical_id for case in cases}
        rows = {
            (row.logical_identifier, bytes(row.payload)): row
            for row in TelemetryRaw.objects.filter(logical_identifier__in=logical_ids)
        }
        assert len(rows) == len(cases)
        assert (repeat.logical_id, repeat.payload) not in rows
        for case in cases:
            row = rows[(case.logical_id, case.payload)]
            described = (case.payload[:120], row.status, row.reason)
            assert row.status == case.status, described
            if case.reason:
                assert case.reason in row.reason, described
            else:
                assert row.reason == "", described
            assert row.readings == case.readings, described
            assert TelemetryHistory.objects.filter(raw_id=row.pk).count() == case.readings, described
        unknown = next(case for case in cases if case.reason == "unknown device")
        assert rows[(unknown.logical_id, unknown.payload)].device_id is None
        registered = Device.objects.get(logical_identifier=new_child)
        assert registered.parent_device_id == fleet.gateway.pk and registered.device_role == "child"
        assert Device.objects.filter(parent_device=fleet.strict_gateway).count() == 0
    with schema_context(beta.schema):
        assert not TelemetryRaw.objects.filter(logical_identifier=fleet.beta_device.logical_identifier).exists()
        assert not TelemetryHistory.objects.filter(device_id=fleet.beta_device.pk).exists()

    def count(status: str) -> int:
        return sum(1 for case in cases if case.status == status)

    assert result.accepted == count(RawStatus.ACCEPTED)
    assert result.rejected == count(RawStatus.REJECTED)
    assert result.chunks == count(RawStatus.CHUNK) + count(RawStatus.IGNORED)
    assert result.duplicates == 1
    assert result.readings == sum(case.readings for case in cases)
    assert result.children_registered == 1


# --- Statements per batch --------------------------------------------------------------------------


_offsets = itertools.count()


def endpoint_messages(devices: list[Device], count: int, start: datetime) -> list[IncomingMessage]:
    """`count` messages spread over the devices, each with its own msg_id and receive time (the
    reading time: no two readings of a device share one, so none takes the conflict path)."""
    return [
        IncomingMessage(
            key=new_message_id(),
            logical_id=devices[i % len(devices)].logical_identifier,
            received_at=start + timedelta(microseconds=next(_offsets)),
            payload=orjson.dumps(
                {"msg_id": unique_id("q"), "values": {"temperature": float(i % 50), "humidity": 50.0}}
            ),
        )
        for i in range(count)
    ]


def test_it_stores_ten_or_a_hundred_messages_with_the_same_statements(
    db: None, alpha: TenantPersona, settings: SettingsWrapper
) -> None:
    # Every device heard from in one UPDATE, whatever its last_seen slot (the slots would make a
    # batch that happens to cross a device's slot boundary write one more).
    settings.ARGUS_LAST_SEEN_RESOLUTION_SECONDS = 0
    start = timezone.now()
    with schema_context(alpha.schema):
        device_type = endpoint_type()
        devices = [make_device(device_type) for _ in range(4)]
        profiles = ProfileCache()
        # Profiles loaded first: what a lookup costs is the cache's business, not the batch size's.
        ingest_batch(messages=endpoint_messages(devices, len(devices), start), profiles=profiles)
        statements: dict[int, list[str]] = {}
        for size in (10, 100):
            messages = endpoint_messages(devices, size, start)
            with CaptureQueriesContext(connection) as captured:
                result = ingest_batch(messages=messages, profiles=profiles)
            assert (result.accepted, result.rejected, result.duplicates, result.readings) == (size, 0, 0, 2 * size)
            statements[size] = [query["sql"] for query in captured.captured_queries]
    assert len(statements[10]) == len(statements[100]), statements


def test_it_sets_the_tenants_search_path_at_most_once_per_batch(live_db: None, alpha: TenantPersona) -> None:
    start = timezone.now()
    with schema_context(alpha.schema):
        devices = [make_device(endpoint_type()) for _ in range(3)]
        profiles = ProfileCache()
        messages = endpoint_messages(devices, 20, start)
        with CaptureQueriesContext(connection) as captured:
            result = ingest_batch(messages=messages, profiles=profiles)
        # TENANT_LIMIT_SET_CALLS: the path is set when the schema changes, not before every cursor
        # (none here when the connection is already in the tenant's schema).
        sets = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("SET search_path")]
        assert len(sets) <= 1, [q["sql"][:60] for q in captured.captured_queries]
        assert (result.accepted, result.readings) == (20, 40)
        # Redelivered: the COPY meets the ingest keys and rolls back to its savepoint, after which
        # django-tenants sets the path again as it always did; nothing is stored twice.
        again = ingest_batch(messages=messages, profiles=profiles)
        assert (again.accepted, again.duplicates) == (0, 20)
        ids = [d.pk for d in devices]
        assert TelemetryRaw.objects.filter(device_id__in=ids).count() == 20
        assert TelemetryHistory.objects.filter(device_id__in=ids).count() == 40


def test_it_looks_up_a_batchs_device_profiles_in_one_round_trip_each(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        devices = [make_device(endpoint_type()) for _ in range(5)]
        ids = [d.logical_identifier for d in devices] + [unique_id("nobody")]
        cold = ProfileCache()
        with CaptureQueriesContext(connection) as captured:
            cold.prefetch_devices(alpha.schema, ids * 3)  # a batch names each device many times
            found = {i: cold.device(alpha.schema, i) for i in ids}
        # One query for all of them, none per lookup (besides the schema and the cache's key prefix).
        device_queries = [q["sql"] for q in captured.captured_queries if 'FROM "devices"' in q["sql"]]
        assert len(device_queries) == 1, captured.captured_queries
        assert {i: p.id if p else None for i, p in found.items()} == {
            **{d.logical_identifier: d.pk for d in devices},
            ids[-1]: None,
        }
        # Another process (nothing local): the known ones come from Redis, in one MGET.
        warm = ProfileCache()
        warm.prefetch_devices(alpha.schema, ids[:-1])
        with CaptureQueriesContext(connection) as captured:
            assert [warm.device(alpha.schema, i) for i in ids[:-1]] == [found[i] for i in ids[:-1]]
            # Expired locally: fetched again before the batch, not one by one during it.
            for key, (_, value) in list(warm._local.items()):
                warm._local[key] = (0.0, value)
            warm.prefetch_devices(alpha.schema, ids[:-1])
            assert all(entry[0] > time.monotonic() for entry in warm._local.values())
        assert not [q for q in captured.captured_queries if 'FROM "devices"' in q["sql"]]


# --------------------------------------------------------------------------- outages (argus/outage.py)


def test_it_tells_a_database_outage_from_a_messages_own_fault() -> None:
    lost = psycopg.OperationalError("the connection is lost")
    try:
        try:
            raise lost
        except psycopg.OperationalError as exc:
            raise django.db.OperationalError(str(exc)) from exc
    except django.db.OperationalError as wrapped:
        assert is_database_error(wrapped)
    assert is_database_error(lost)
    assert is_database_error(django.db.InterfaceError("connection already closed"))
    assert not is_database_error(psycopg.DataError("invalid byte sequence"))
    assert not is_database_error(django.db.IntegrityError("duplicate key"))
    assert not is_database_error(ValueError("bad payload"))


def test_it_logs_an_outage_once_and_backs_off_up_to_five_seconds(caplog: pytest.LogCaptureFixture) -> None:
    tracker = Outage("test-database")
    with caplog.at_level(logging.INFO, logger="argus.outage"):
        tracker.recovered()  # nothing to end
        delays = [tracker.failed(psycopg.OperationalError("connection refused")) for _ in range(8)]
        tracker.recovered()
        tracker.recovered()
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0][0] == "WARNING" and "test-database outage started" in lines[0][1]
    assert lines[1][0] == "INFO" and "test-database outage ended" in lines[1][1] and "8 failed" in lines[1][1]
    assert SERVICE_UP.labels("test-database")._value.get() == 1
