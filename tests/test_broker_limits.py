"""A broker's own limits made visible (issue 11, item 2): a broker configured like Debian's stock
Mosquitto (a small queue per offline session) drops acknowledged messages while the bridge is
away; the bridge reads the broker's $SYS counters and says so with an ERROR naming the setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django_tenants.utils import schema_context

from bridge.bridge import BROKER_STAT
from devtools.services import ServerHandle, start_mosquitto
from telemetry.models import TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type
from tests.pipeline import Pipeline, publisher, wait_for

pytestmark = pytest.mark.integration

QUEUE = 10


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[ServerHandle]:
    """The shipped broker with the stock queue limit shrunk, its counters published every second."""
    with start_mosquitto(conf_extra=f"max_queued_messages {QUEUE}\nsys_interval 1", workdir=tmp_path / "broker") as b:
        yield b


def test_it_reports_what_a_broker_drops_while_the_bridge_is_away(
    small_broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona, tmp_path: Path
) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    running = Pipeline(small_broker, nats_server, tmp_path).start()
    try:
        running.bridge.stop()  # its session stays on the broker, which now queues for it
        with publisher(running.mqtt_url) as sender:
            for i in range(5 * QUEUE):
                sender.send(device.logical_identifier, {"msg_id": f"q-{i}", "values": {"temperature": 1}})
        running.start_bridge()

        def drop_lines() -> list[str]:
            return [x for x in running.bridge.log().splitlines() if "the MQTT broker dropped" in x]

        def stored() -> int:
            with schema_context(alpha.schema):
                return TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier).count()

        def dropped_in_all() -> int:
            # The counter is republished every sys_interval, so the first value the bridge hears may
            # be from before the publisher finished: each line gives the broker's total so far.
            lines = drop_lines()
            return int(lines[-1].split("(")[1].split()[0]) if lines else 0

        first = wait_for(lambda: next(iter(drop_lines()), None), timeout=30, what="the bridge's ERROR about the drops")
        assert "ERROR" in first and "max_queued_messages" in first
        wait_for(lambda: stored() >= QUEUE, what="the messages the broker kept")
        # What the stock limit costs: the broker kept QUEUE (and those in flight), dropped the rest,
        # and the bridge accounted for every one of them.
        wait_for(lambda: dropped_in_all() + stored() >= 5 * QUEUE, timeout=30, what="every drop reported")
    finally:
        running.stop()
    assert stored() < 5 * QUEUE


def test_it_exports_the_brokers_counters() -> None:
    from bridge.bridge import MqttBridge

    bridge = MqttBridge(mqtt_url="mqtt://127.0.0.1:1", nats_url="nats://127.0.0.1:1", client_id="argus-test-stats")
    bridge._broker_stat("$SYS/broker/store/messages/count", b"42")
    bridge._broker_stat("$SYS/broker/publish/messages/dropped", b"7")
    assert BROKER_STAT.labels("store_messages")._value.get() == 42
    assert BROKER_STAT.labels("publish_messages_dropped")._value.get() == 7
