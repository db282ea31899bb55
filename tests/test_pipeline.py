"""The MQTT → NATS JetStream → PostgreSQL pipeline, end to end, with real processes and servers.

A private Mosquitto (our shipped configuration) and a private nats-server per module; runbridge
and runingest run as child processes against the test database.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django_tenants.utils import schema_context

from argus.registry import use_public_schema
from devices.models import Device, DeviceType, ProcessingMode
from devtools.services import ServerHandle
from telemetry.jetstream import H_REASON
from telemetry.models import RawStatus, TelemetryHistory, TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client, unique_id
from tests.pipeline import Pipeline, Publisher, publisher, read_deadletters, wait_for

pytestmark = pytest.mark.integration

NOW_MS = lambda: int(time.time() * 1000)  # noqa: E731


def endpoint_type() -> DeviceType:
    return make_device_type(
        metrics=["temperature", "humidity"],
        message_schema={
            "type": "object",
            "properties": {
                "values": {
                    "type": "object",
                    "properties": {"temperature": {"type": "number", "minimum": -60, "maximum": 120}},
                }
            },
        },
    )


def raw_rows(schema: str, logical_id: str) -> list[TelemetryRaw]:
    with schema_context(schema):
        return list(TelemetryRaw.objects.filter(logical_identifier=logical_id).order_by("id"))


def history_count(schema: str, device_ids: list[int]) -> int:
    with schema_context(schema):
        return TelemetryHistory.objects.filter(device_id__in=device_ids).count()


# --- The happy paths --------------------------------------------------------------------------------


def test_it_stores_a_message_published_with_mosquitto_pub(pipeline: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    ts = NOW_MS()
    payload = json.dumps({"msg_id": "m-1", "ts": ts, "values": {"temperature": 21.5, "humidity": 40.2}})
    port = pipeline.mqtt_url.rsplit(":", 1)[1]
    subprocess.run(
        ["mosquitto_pub", "-p", port, "-q", "1", "-t", f"devices/{device.logical_identifier}/telemetry", "-m", payload],
        check=True,
    )
    rows = wait_for(lambda: raw_rows(alpha.schema, device.logical_identifier), what="the raw row")
    assert len(rows) == 1
    assert bytes(rows[0].payload) == payload.encode()
    assert rows[0].status == RawStatus.ACCEPTED and rows[0].msg_id == "m-1" and rows[0].readings == 2
    with schema_context(alpha.schema):
        readings = {
            (r.metric, r.value, int(r.time.timestamp() * 1000))
            for r in TelemetryHistory.objects.filter(device_id=device.pk)
        }
        assert readings == {("temperature", 21.5, ts), ("humidity", 40.2, ts)}
        assert all(r.raw_id == rows[0].pk for r in TelemetryHistory.objects.filter(device_id=device.pk))
        assert Device.objects.get(pk=device.pk).last_seen is not None


def test_it_demultiplexes_a_gateway_message_into_child_series(pipeline: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        gateway_type = make_device_type(
            processing_mode=ProcessingMode.GATEWAY, metrics=["rssi", "battery"], auto_register_children=True
        )
        gateway = make_device(gateway_type, device_role="gateway")
    children: list[dict[str, Any]] = [
        {"id": unique_id("BEACON"), "values": {"rssi": -60 - i, "battery": 90}} for i in range(50)
    ]
    with publisher(pipeline.mqtt_url) as device:
        device.send(gateway.logical_identifier, {"msg_id": "g-1", "ts": NOW_MS(), "children": children})
    wait_for(lambda: raw_rows(alpha.schema, gateway.logical_identifier), what="the gateway's raw row")
    with schema_context(alpha.schema):
        registered = {d.logical_identifier: d for d in Device.objects.filter(parent_device=gateway)}
        assert set(registered) == {c["id"] for c in children}
        assert all(d.device_role == "child" for d in registered.values())
        for child in children:
            series = dict(
                TelemetryHistory.objects.filter(device_id=registered[child["id"]].pk).values_list("metric", "value")
            )
            assert series == child["values"]


def test_it_stores_a_repeated_msg_id_once(pipeline: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    message = {"msg_id": "dup-1", "ts": NOW_MS(), "values": {"temperature": 20.0}}
    with publisher(pipeline.mqtt_url) as sender:
        for _ in range(3):
            sender.send(device.logical_identifier, message)
        sender.send(device.logical_identifier, {"msg_id": "after", "values": {"temperature": 20.5}})
    wait_for(lambda: any(r.msg_id == "after" for r in raw_rows(alpha.schema, device.logical_identifier)), what="rows")
    time.sleep(0.5)
    assert [r.msg_id for r in raw_rows(alpha.schema, device.logical_identifier)] == ["dup-1", "after"]
    assert history_count(alpha.schema, [device.pk]) == 2


# --- Bad input -------------------------------------------------------------------------------------


def test_it_records_bad_messages_with_reasons_and_keeps_the_stream_flowing(
    pipeline: Pipeline, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    logical_id = device.logical_identifier
    far_future = NOW_MS() + 10 * 365 * 24 * 3600 * 1000
    bad = {
        "malformed": (b'{"values": {"temperature": 21', "malformed JSON"),
        "schema": (
            json.dumps({"msg_id": "schema", "values": {"temperature": 500}}).encode(),
            "schema: values/temperature",
        ),
        "nan": (b'{"msg_id": "nan", "values": {"temperature": NaN}}', "malformed JSON"),
        "infinity": (b'{"msg_id": "inf", "values": {"temperature": Infinity}}', "malformed JSON"),
        "huge_number": (b'{"msg_id": "big", "values": {"temperature": 1e400}}', "malformed JSON"),
        "absurd_ts": (json.dumps({"msg_id": "ts", "ts": far_future, "values": {"temperature": 1}}).encode(), "too far"),
        "bad_ts": (json.dumps({"msg_id": "ts2", "ts": "yesterday", "values": {"temperature": 1}}).encode(), "RFC 3339"),
        "string_value": (json.dumps({"msg_id": "str", "values": {"temperature": "hot"}}).encode(), "not a number"),
        "no_values": (json.dumps({"msg_id": "nov", "ts": NOW_MS()}).encode(), "values must be"),
    }
    with publisher(pipeline.mqtt_url) as sender:
        for i, (payload, _) in enumerate(bad.values()):
            sender.send(logical_id, payload)
            sender.send(logical_id, {"msg_id": f"good-{i}", "values": {"temperature": 20 + i}})
        oversized = b'{"msg_id": "oversized", "values": {"x": 1}, "pad": "' + b"x" * 300_000 + b'"}'
        sender.send(logical_id, oversized)
        sender.send(logical_id, b"\xff\xfe not utf-8")
        sender.send(unique_id("NO-SUCH-DEVICE"), {"values": {"temperature": 1}})
        sender.send(logical_id, {"msg_id": "last", "values": {"temperature": 30}})
    rows = wait_for(
        lambda: (r := raw_rows(alpha.schema, logical_id)) and any(x.msg_id == "last" for x in r) and r,
        what="the last good message",
    )
    good = [r for r in rows if r.status == RawStatus.ACCEPTED]
    assert sorted(str(r.msg_id) for r in good) == sorted([f"good-{i}" for i in range(len(bad))] + ["last"])
    rejected = [r for r in rows if r.status == RawStatus.REJECTED]
    # A known device's oversized (kept cut to the limit) and non-UTF-8 payloads are its tenant's
    # rejected rows too (issue 10); only the unknown device's message is a dead letter.
    bad["oversized"] = (oversized[: settings.ARGUS_MAX_PAYLOAD_BYTES], f"payload of {len(oversized)} bytes exceeds")
    bad["not_utf8"] = (b"\xff\xfe not utf-8", "not valid UTF-8")
    assert len(rejected) == len(bad)
    for name, (payload, reason) in bad.items():
        matching = [r for r in rejected if bytes(r.payload) == payload]
        assert len(matching) == 1, name
        assert reason in matching[0].reason, (name, matching[0].reason)
    assert history_count(alpha.schema, [device.pk]) == len(good)

    dead = wait_for(lambda: read_deadletters(pipeline.nats_url), what="dead letters")
    reasons = {subject: headers.get(H_REASON, "") for subject, headers, _ in dead}
    assert set(reasons) == {"deadletter.unknown_device"}
    assert "no device" in reasons["deadletter.unknown_device"]


def test_it_rejects_unknown_children_when_the_type_does_not_register_them(
    pipeline: Pipeline, alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        gateway = make_device(
            make_device_type(processing_mode=ProcessingMode.GATEWAY, metrics=["rssi"]), device_role="gateway"
        )
    with publisher(pipeline.mqtt_url) as sender:
        sender.send(
            gateway.logical_identifier, {"msg_id": "x", "children": [{"id": "STRANGER-1", "values": {"rssi": -50}}]}
        )
    rows = wait_for(lambda: raw_rows(alpha.schema, gateway.logical_identifier), what="the rejected row")
    assert rows[0].status == RawStatus.REJECTED
    assert "unknown child device STRANGER-1" in rows[0].reason
    with schema_context(alpha.schema):
        assert not Device.objects.filter(logical_identifier="STRANGER-1").exists()


def test_it_never_routes_a_device_into_another_tenant(
    pipeline: Pipeline, alpha: TenantPersona, beta: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        gateway = make_device(
            make_device_type(processing_mode=ProcessingMode.GATEWAY, metrics=["rssi"], auto_register_children=True),
            device_role="gateway",
        )
    with schema_context(beta.schema):
        betas = make_device(endpoint_type())
    with publisher(pipeline.mqtt_url) as sender:
        # A child id that is beta's device: must not be registered in alpha nor written to beta.
        sender.send(
            gateway.logical_identifier,
            {"msg_id": "steal", "children": [{"id": betas.logical_identifier, "values": {"rssi": -1}}]},
        )
    rows = wait_for(lambda: raw_rows(alpha.schema, gateway.logical_identifier), what="the rejected row")
    assert rows[0].status == RawStatus.REJECTED and "another tenant" in rows[0].reason
    assert raw_rows(beta.schema, betas.logical_identifier) == []
    assert history_count(beta.schema, [betas.pk]) == 0


# --- Crashes lose nothing and duplicate nothing --------------------------------------------------------


def publish_stream(mqtt_url: str, logical_id: str, count: int, done: threading.Event) -> None:
    sender = Publisher(mqtt_url)
    try:
        infos = []
        for i in range(count):
            infos.append(
                sender.send(
                    logical_id, {"msg_id": f"s-{i}", "values": {"temperature": i % 100, "humidity": 50}}, wait=False
                )
            )
            if i % 200 == 0:
                time.sleep(0.05)
        for info in infos:
            info.wait_for_publish(30)
    finally:
        sender.close()
        done.set()


@pytest.mark.parametrize("victim", ["bridge", "ingest"])
def test_it_loses_and_duplicates_nothing_when_a_process_is_killed(
    pipeline: Pipeline, alpha: TenantPersona, victim: str
) -> None:
    with schema_context(alpha.schema):
        device = make_device(endpoint_type())
    count = 3000
    done = threading.Event()
    thread = threading.Thread(target=publish_stream, args=(pipeline.mqtt_url, device.logical_identifier, count, done))
    thread.start()
    wait_for(lambda: len(raw_rows(alpha.schema, device.logical_identifier)) > 300, what="the stream to flow")
    process = pipeline.bridge if victim == "bridge" else pipeline.ingest
    process.kill()
    stored_at_kill = len(raw_rows(alpha.schema, device.logical_identifier))
    time.sleep(1)
    if victim == "bridge":
        pipeline.start_bridge()
    else:
        process.start()
    thread.join(60)
    assert done.is_set()
    wait_for(
        lambda: len(raw_rows(alpha.schema, device.logical_identifier)) >= count,
        timeout=60,
        what=f"all {count} messages (had {stored_at_kill} when the {victim} was killed)",
    )
    time.sleep(1)  # anything redelivered late would show up now
    rows = raw_rows(alpha.schema, device.logical_identifier)
    assert stored_at_kill < count
    assert sorted(str(r.msg_id) for r in rows) == sorted(f"s-{i}" for i in range(count))
    assert history_count(alpha.schema, [device.pk]) == 2 * count


# --- Profiles are data --------------------------------------------------------------------------------


def test_it_applies_an_admin_edit_of_a_device_type_without_a_restart(pipeline: Pipeline, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device_type = endpoint_type()
        device = make_device(device_type)
    with publisher(pipeline.mqtt_url) as sender:
        sender.send(device.logical_identifier, {"msg_id": "before", "values": {"temperature": 80}})
        wait_for(lambda: raw_rows(alpha.schema, device.logical_identifier), what="the first message")
        assert raw_rows(alpha.schema, device.logical_identifier)[0].status == RawStatus.ACCEPTED

        # An operator lowers the schema's maximum to 50 in the admin.
        client = tenant_admin_client(alpha)
        schema = device_type.message_schema
        schema["properties"]["values"]["properties"]["temperature"]["maximum"] = 50
        form = {
            "name": device_type.name,
            "description": "",
            "processing_mode": device_type.processing_mode,
            "protocol_adapter": device_type.protocol_adapter,
            "message_schema": json.dumps(schema),
            "metrics": json.dumps(device_type.metrics),
            "child_device_type": "",
            "max_children": "5000",
            "chunk_ttl_seconds": "60",
            "max_chunks": "100",
        }
        response = client.post(f"/admin/devices/devicetype/{device_type.pk}/change/", form)
        assert response.status_code == 302
        use_public_schema()

        def second_rejected() -> bool:
            msg_id = unique_id("after")
            sender.send(device.logical_identifier, {"msg_id": msg_id, "values": {"temperature": 80}})
            row = wait_for(
                lambda: [r for r in raw_rows(alpha.schema, device.logical_identifier) if r.msg_id == msg_id],
                what="the next message",
            )[0]
            return row.status == RawStatus.REJECTED and "maximum" in row.reason

        started = time.monotonic()
        wait_for(second_rejected, timeout=10, interval=0.2, what="the edited schema to apply")
        assert time.monotonic() - started < 10


def test_it_exits_zero_on_sigterm(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, tmp_path: Path
) -> None:
    running = Pipeline(broker, nats_server, tmp_path).start()
    assert running.bridge.stop() == 0, running.bridge.log()
    assert running.ingest.stop() == 0, running.ingest.log()
    assert "runbridge stopped" in running.bridge.log()
    assert "runingest stopped" in running.ingest.log()


def test_it_routes_every_message_while_cached_routes_keep_expiring(
    broker: ServerHandle, nats_server: ServerHandle, live_db: None, alpha: TenantPersona, tmp_path: Path
) -> None:
    # Routes expiring while a batch was being routed once sent valid devices to the dead letters.
    with schema_context(alpha.schema):
        device_type = endpoint_type()
        devices = [make_device(device_type) for _ in range(20)]
    running = Pipeline(broker, nats_server, tmp_path, extra_env={"ARGUS_BRIDGE_ROUTE_TTL_SECONDS": "0.05"}).start()
    try:
        with publisher(running.mqtt_url) as sender:
            sent = [
                sender.send(
                    devices[i % 20].logical_identifier, {"msg_id": f"r-{i}", "values": {"temperature": 1}}, wait=False
                )
                for i in range(2000)
            ]
            for info in sent:
                info.wait_for_publish(30)
        ids = [d.logical_identifier for d in devices]

        def stored() -> int:
            with schema_context(alpha.schema):
                return TelemetryRaw.objects.filter(logical_identifier__in=ids).count()

        wait_for(lambda: stored() >= 2000, timeout=60, what=lambda: f"2000 stored (have {stored()})")
        assert "dead-letter" not in running.bridge.log()
    finally:
        running.stop()
