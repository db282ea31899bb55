"""The bridge never wedges on a failing JetStream publish (issue 11, item 3): nats-py takes a slot of
its pending-publish window before sending, and a send that raises never gave it back; once the
window was used up, every publish waited forever. And `step()` with devices' status messages
(issue 17): per tenant, retained replays apart, unknown devices and the over-limit dropped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import paho.mqtt.client as mqtt

from bridge.bridge import MqttBridge, Pending, Route
from devtools.services import ServerHandle
from telemetry import jetstream as js_defs

WINDOW = 2


def pending(i: int, size: int = 16) -> Pending:
    return Pending(acks=[], subject="telemetry.wedge.envelope", payload=b"x" * size, headers={"Nats-Msg-Id": f"w-{i}"})


async def bridge_on(nats_server: ServerHandle) -> tuple[MqttBridge, nats.NATS]:
    nc = await nats.connect(nats_server.url)
    bridge = MqttBridge(mqtt_url="mqtt://127.0.0.1:1", nats_url=nats_server.url, client_id="argus-test-wedge")
    bridge._nc = nc
    bridge._js = nc.jetstream(publish_async_max_pending=WINDOW)
    return bridge, nc


def test_it_keeps_publishing_after_sends_that_raise(nats_server: ServerHandle) -> None:
    async def scenario() -> None:
        bridge, nc = await bridge_on(nats_server)
        try:
            # Over the server's max_payload (1 MB): the send raises after the slot was taken.
            for i in range(3 * WINDOW):
                attempt = pending(i, size=2 * 1024 * 1024)
                await asyncio.wait_for(bridge._publish(attempt), 5)
                assert attempt.failed
            # The window is whole again: a publish that fits goes through.
            ok = pending(99)
            await asyncio.wait_for(bridge._publish(ok), 5)
            assert not ok.failed and ok.future is not None
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_it_does_not_publish_while_nats_is_away(nats_server: ServerHandle) -> None:
    async def scenario() -> None:
        bridge, nc = await bridge_on(nats_server)
        await nc.close()
        for i in range(3 * WINDOW):
            attempt = pending(i)
            await asyncio.wait_for(bridge._publish(attempt), 5)
            assert attempt.failed  # the sweep publishes it again once NATS is back

    asyncio.run(scenario())


def status_message(mid: int, logical_id: str, payload: bytes, *, retain: bool = False) -> mqtt.MQTTMessage:
    message = mqtt.MQTTMessage(mid, f"devices/{logical_id}/status".encode())
    message.payload, message.qos, message.retain = payload, 1, retain
    return message


def test_it_sends_statuses_in_status_envelopes_of_their_tenant_apart_from_retained_replays(
    nats_server: ServerHandle, settings: Any
) -> None:
    settings.ARGUS_BRIDGE_DEVICE_RATE, settings.ARGUS_BRIDGE_DEVICE_BURST = 1.0, 2.0

    async def scenario() -> None:
        bridge, nc = await bridge_on(nats_server)
        bridge._js = nc.jetstream()
        await js_defs.ensure_streams(bridge._js)
        try:
            later = time.monotonic() + 60
            bridge.routes._routes.update(
                {"DEV-1": (later, Route("alpha", 1)), "DEV-2": (later, Route("beta", 2)), "NOBODY": (later, None)}
            )
            bridge._incoming.extend(
                [
                    status_message(1, "DEV-1", b'{"state": "online"}'),
                    status_message(2, "DEV-2", b"online", retain=True),
                    status_message(3, "NOBODY", b"online"),  # unknown: dropped, never a dead letter
                    status_message(4, "DEV-1", b"offline"),
                    status_message(5, "DEV-1", b"online"),  # over DEV-1's burst of 2: dropped
                ]
            )
            bridge._incoming_since = 0.0
            assert await bridge.step()
            sent = sorted(bridge._inflight.values(), key=lambda p: p.subject)
            assert [(p.subject, p.headers.get(js_defs.H_RETAINED), p.acks) for p in sent] == [
                ("telemetry.alpha.status", None, [(1, 1), (4, 1)]),
                ("telemetry.beta.status", "1", [(2, 1)]),
            ]
            records = js_defs.decode_envelope(sent[0].payload)
            assert [(r.logical_id, r.payload) for r in records] == [
                ("DEV-1", b'{"state": "online"}'),
                ("DEV-1", b"offline"),
            ]
            assert records[0].received_us < records[1].received_us
        finally:
            await nc.close()

    asyncio.run(scenario())
