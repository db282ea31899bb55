"""One device flooding over MQTT must not starve the others (issue 10, item 9).

A device publishes flat out while another reports 100 times a second (both limited to 200/s). The flooder's messages
over its rate limit are stored as rejected (`rate_limited`) — none lost, none decoded into
readings — and the other device's messages all arrive, their latency unaffected.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from django.db.models import Count
from django_tenants.utils import schema_context

from bridge.bridge import DeviceRateLimit
from devtools.services import ServerHandle
from telemetry.models import TelemetryRaw
from tests.conftest import TenantPersona, make_device
from tests.pipeline import Pipeline, Publisher, wait_for
from tests.test_pipeline import endpoint_type

RATE, BURST = 200, 400
SECONDS = 8


def test_it_limits_each_device_to_its_rate_with_a_burst() -> None:
    limit = DeviceRateLimit(rate=10, burst=5)
    assert [limit.allow("A", 100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limit.allow("B", 100.0)  # another device has its own bucket
    assert limit.allow("A", 100.15)  # 0.15 s at 10/s: one token and a half back
    assert not limit.allow("A", 100.15)
    limit.sweep(200.0)  # long idle: the bucket is forgotten, i.e. full again
    assert all(limit.allow("A", 200.0) for _ in range(5))
    assert all(DeviceRateLimit(rate=0, burst=1).allow("A", 0.0) for _ in range(1000))


def flood(mqtt_url: str, logical_id: str, stop: threading.Event, sent: list[int]) -> None:
    """Publish QoS 1 as fast as the broker takes it (a window of 2000 unacknowledged)."""
    publisher = Publisher(mqtt_url)
    try:
        infos: list[mqtt.MQTTMessageInfo] = []
        while not stop.is_set():
            payload = b'{"msg_id": "f-%d", "values": {"temperature": 1}}' % len(infos)
            infos.append(publisher.send(logical_id, payload, wait=False))
            if len(infos) > 2000:
                infos[-2000].wait_for_publish(60)
        for info in infos:
            info.wait_for_publish(60)
        sent.append(len(infos))
    finally:
        publisher.close()


def test_it_keeps_other_devices_flowing_while_one_floods(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona, tmp_path: Path
) -> None:
    with schema_context(alpha.schema):
        device_type = endpoint_type()
        flooder = make_device(device_type)
        victim = make_device(device_type)
    limits = {"ARGUS_BRIDGE_DEVICE_RATE": str(RATE), "ARGUS_BRIDGE_DEVICE_BURST": str(BURST)}
    running = Pipeline(broker, nats_server, tmp_path, extra_env=limits).start()
    try:
        stop, flooded = threading.Event(), list[int]()
        thread = threading.Thread(target=flood, args=(running.mqtt_url, flooder.logical_identifier, stop, flooded))
        thread.start()
        sender = Publisher(running.mqtt_url)
        try:
            count = 100 * SECONDS
            start = time.time()
            for i in range(count):
                # 100 msg/s, on a schedule (not after each publish), each stamped when sent.
                time.sleep(max(0.0, start + i / 100 - time.time()))
                ts = int(time.time() * 1000)
                sender.send(victim.logical_identifier, {"msg_id": f"v-{i}", "ts": ts, "values": {"temperature": 2}})
        finally:
            sender.close()
            stop.set()
            thread.join(120)
        assert flooded, "the flooder did not finish"
        sent = flooded[0]

        def stored(logical_id: str) -> int:
            with schema_context(alpha.schema):
                return TelemetryRaw.objects.filter(logical_identifier=logical_id).count()

        wait_for(lambda: stored(victim.logical_identifier) >= count, timeout=60, what="the victim's messages")
        wait_for(lambda: stored(flooder.logical_identifier) >= sent, timeout=120, what="the flooder's messages")
        with schema_context(alpha.schema):
            rows = list(TelemetryRaw.objects.filter(logical_identifier=victim.logical_identifier))
            flood_outcomes = dict(
                TelemetryRaw.objects.filter(logical_identifier=flooder.logical_identifier)
                .values_list("status")
                .annotate(n=Count("id"))
            )
            reasons = set(
                TelemetryRaw.objects.filter(logical_identifier=flooder.logical_identifier, status="rejected")
                .values_list("reason", flat=True)
                .distinct()
            )
    finally:
        running.stop()
    # Nothing of the victim's lost, all accepted, none stored twice.
    assert sorted(str(r.msg_id) for r in rows) == sorted(f"v-{i}" for i in range(count))
    assert {r.status for r in rows} == {"accepted"}
    latencies = sorted((r.stored_at.timestamp() - _sent_at(r)) for r in rows)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"flood: {sent} sent in {SECONDS} s, outcomes {flood_outcomes}; victim p99 {p99 * 1000:.0f} ms")
    assert p99 < 1.0, f"victim p99 latency {p99:.3f}s under a flood of {sent} messages"
    # Every flood message is accounted for; what went over the limit is rejected with its reason.
    assert sum(flood_outcomes.values()) == sent
    elapsed_allowance = BURST + RATE * (SECONDS + 30)
    assert flood_outcomes.get("accepted", 0) <= elapsed_allowance
    assert flood_outcomes.get("rejected", 0) >= sent - elapsed_allowance > 0
    assert len(reasons) == 1 and next(iter(reasons)).startswith("rate_limited: ")


def _sent_at(row: TelemetryRaw) -> float:
    import orjson

    return orjson.loads(bytes(row.payload))["ts"] / 1000
