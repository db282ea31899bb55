"""The bridge never wedges on a failing JetStream publish (issue 11, item 3): nats-py takes a slot of
its pending-publish window before sending, and a send that raises never gave it back; once the
window was used up, every publish waited forever."""

from __future__ import annotations

import asyncio

import nats

from bridge.bridge import MqttBridge, Pending
from devtools.services import ServerHandle

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
