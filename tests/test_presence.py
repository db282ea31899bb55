"""Presence and feedback to the device (issue 17, items 4 and 5; docs/ingestion.md, "Status and
errors").

The units of work first, on the real test database: parsing a status, `ingest_batch` storing
presence (newest wins, retained replays never move `presence_since`), the `inactive`
annotation, the feedback a rejection yields, the bridge's feedback rate limit. Then what shows
it: the operator API with its filters, the admin's device list, the dashboard, the gauges. Then
end to end through a private Mosquitto, runbridge, NATS and runingest: a device killed without
a DISCONNECT goes offline by its last will and comes back online, and a rejected message is
answered on its device's errors topic only. The mTLS/ACL side (a device cannot write another's
status, nor read another's errors) is in tests/test_mtls_pipeline.py.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context
from paho.mqtt.enums import CallbackAPIVersion

from argus.checks import bounds_check
from bridge.bridge import DeviceRateLimit
from dashboard.selectors import overview
from dashboard.views import _for_page
from devices import pki
from devices.models import Device, DeviceStatus, inactive_condition, presence_text
from devtools.simulator import SimulatorConfig, run_simulation
from telemetry.ingest import ingest_batch
from telemetry.messages import KIND_STATUS, IncomingMessage
from telemetry.models import TelemetryRaw
from telemetry.presence import InvalidStatus, parse_status
from telemetry.profiles import ProfileCache
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client, unique_id
from tests.pipeline import Pipeline, wait_for
from tests.test_api import API, ApiUser, api_user

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def status(logical_id: str, payload: bytes, *, at: Any = None, retained: bool = False) -> IncomingMessage:
    return IncomingMessage(
        key=unique_id("k"),
        logical_id=logical_id,
        received_at=at or timezone.now(),
        payload=payload,
        kind=KIND_STATUS,
        retained=retained,
    )


def presence_of(device: Device) -> tuple[bool | None, Any, str]:
    device.refresh_from_db()
    return device.online, device.presence_since, device.last_disconnect_reason


# --------------------------------------------------------------------------- parsing and storing


def test_it_reads_both_status_forms_and_refuses_anything_else() -> None:
    assert parse_status(b'{"state": "online"}') == (True, "")
    assert parse_status(b'{"state": "offline", "reason": "battery low"}') == (False, "battery low")
    assert parse_status(b"offline\n") == (False, "")
    assert parse_status(b'{"state": "offline", "reason": "' + b"x" * 500 + b'"}')[1] == "x" * 200
    for bad in (b"", b"maybe", b"[]", b'{"state": "away"}', b'{"state": "online", "reason": 3}', b"\xff"):
        with pytest.raises(InvalidStatus):
            parse_status(bad)


def test_it_stores_online_then_offline_with_its_reason_and_keeps_the_reason_when_back(
    in_alpha: TenantPersona,
) -> None:
    device = make_device(make_device_type())
    profiles = ProfileCache()
    t0 = timezone.now()
    ingest_batch(messages=[status(device.logical_identifier, b'{"state": "online"}', at=t0)], profiles=profiles)
    assert presence_of(device) == (True, t0, "")
    t1 = t0 + timedelta(seconds=5)
    offline = b'{"state": "offline", "reason": "connection lost"}'
    result = ingest_batch(messages=[status(device.logical_identifier, offline, at=t1)], profiles=profiles)
    assert presence_of(device) == (False, t1, "connection lost")
    assert result.presence[device.pk].online is False
    t2 = t1 + timedelta(seconds=5)
    ingest_batch(messages=[status(device.logical_identifier, b"online", at=t2)], profiles=profiles)
    # Online again, and the operator still sees why it dropped off last time.
    assert presence_of(device) == (True, t2, "connection lost")


def test_it_keeps_presence_and_last_seen_when_a_copy_loaded_before_it_is_saved(in_alpha: TenantPersona) -> None:
    device = make_device(make_device_type())
    stale = Device.objects.get(pk=device.pk)  # the admin's form, an API PATCH
    ingest_batch(messages=[status(device.logical_identifier, b"offline")], profiles=ProfileCache())
    seen = timezone.now()
    Device.objects.filter(pk=device.pk).update(last_seen=seen)  # as telemetry/storage.py writes it
    stale.name = "renamed"
    stale.save()
    device.refresh_from_db()
    assert (device.name, device.online, device.last_seen) == ("renamed", False, seen)


def test_it_lets_the_newest_status_win_whatever_order_they_are_stored_in(in_alpha: TenantPersona) -> None:
    device = make_device(make_device_type())
    profiles = ProfileCache()
    t0 = timezone.now()
    later = status(device.logical_identifier, b'{"state": "offline", "reason": "shutdown"}', at=t0)
    earlier = status(device.logical_identifier, b'{"state": "online"}', at=t0 - timedelta(seconds=1))
    ingest_batch(messages=[later], profiles=profiles)
    # Another ingest process stores the earlier one afterwards: it must not undo the later one.
    result = ingest_batch(messages=[earlier], profiles=profiles)
    assert presence_of(device) == (False, t0, "shutdown")
    assert result.presence == {}
    # Within one batch too.
    t1 = t0 + timedelta(seconds=10)
    ingest_batch(
        messages=[
            status(device.logical_identifier, b"online", at=t1 + timedelta(seconds=1)),
            status(device.logical_identifier, b"offline", at=t1),
        ],
        profiles=profiles,
    )
    assert presence_of(device)[:2] == (True, t1 + timedelta(seconds=1))


def test_it_takes_a_retained_replay_only_when_it_changes_the_state(in_alpha: TenantPersona) -> None:
    device = make_device(make_device_type())
    profiles = ProfileCache()
    t0 = timezone.now()
    ingest_batch(messages=[status(device.logical_identifier, b"online", at=t0)], profiles=profiles)
    # The broker replays the retained "online" whenever the bridge subscribes: not news.
    replay = status(device.logical_identifier, b"online", at=t0 + timedelta(minutes=5), retained=True)
    ingest_batch(messages=[replay], profiles=profiles)
    assert presence_of(device) == (True, t0, "")
    # A retained "offline" we never heard live (the will fired while no bridge was subscribed).
    missed = status(device.logical_identifier, b'{"state":"offline","reason":"connection lost"}', retained=True)
    ingest_batch(messages=[missed], profiles=profiles)
    assert presence_of(device)[0::2] == (False, "connection lost")


def test_it_ignores_invalid_statuses_and_stores_the_telemetry_beside_them(in_alpha: TenantPersona) -> None:
    device = make_device(make_device_type())
    telemetry = IncomingMessage(
        key=unique_id("k"),
        logical_id=device.logical_identifier,
        received_at=timezone.now(),
        payload=b'{"values": {"temperature": 20.5}}',
    )
    result = ingest_batch(
        messages=[status(device.logical_identifier, b"sleepy"), telemetry, status("nobody-here", b"online")],
        profiles=ProfileCache(),
    )
    assert (result.accepted, result.readings, result.presence) == (1, 1, {})
    assert presence_of(device) == (None, None, "")


def test_it_calls_a_device_inactive_after_its_types_intervals_plus_the_last_seen_lag(
    in_alpha: TenantPersona, settings: Any
) -> None:
    settings.ARGUS_PRESENCE_INACTIVE_INTERVALS = 3
    settings.ARGUS_LAST_SEEN_RESOLUTION_SECONDS = 30
    now = timezone.now()
    every_minute = make_device_type(expected_interval_seconds=60)
    # Allowed: 3 x 60 s + 1.5 x 30 s = 225 s of silence.
    silent = make_device(every_minute, last_seen=now - timedelta(seconds=300))
    recent = make_device(every_minute, last_seen=now - timedelta(seconds=200))
    never = make_device(every_minute)
    Device.objects.filter(pk=never.pk).update(created_at=now - timedelta(hours=1))
    new = make_device(every_minute)
    disabled = make_device(every_minute, status=DeviceStatus.DISABLED, last_seen=now - timedelta(days=1))
    untyped = make_device(make_device_type(), last_seen=now - timedelta(days=1))
    flags = {
        d.logical_identifier: d.inactive  # type: ignore[attr-defined]  # the annotation
        for d in Device.objects.with_presence().filter(
            pk__in=[d.pk for d in (silent, recent, never, new, disabled, untyped)]
        )
    }
    assert flags == {
        silent.logical_identifier: True,
        recent.logical_identifier: False,
        never.logical_identifier: True,
        new.logical_identifier: False,
        disabled.logical_identifier: False,
        untyped.logical_identifier: False,
    }


# --------------------------------------------------------------------------- feedback


def test_it_keeps_feedback_for_new_mqtt_rejections_of_types_that_opt_in(in_alpha: TenantPersona) -> None:
    schema = {"type": "object", "properties": {"values": {"type": "object", "required": ["temperature"]}}}
    talkative = make_device(make_device_type(message_schema=schema, error_feedback=True))
    quiet = make_device(make_device_type(message_schema=schema))
    profiles = ProfileCache()
    bad = b'{"msg_id": "bad-1", "values": {"humidity": 3}}'

    def message(device: Device, payload: bytes, transport: str = "mqtt", key: str | None = None) -> IncomingMessage:
        return IncomingMessage(
            key=key or unique_id("k"),
            logical_id=device.logical_identifier,
            received_at=timezone.now(),
            payload=payload,
            transport=transport,
        )

    result = ingest_batch(
        messages=[
            message(talkative, bad),
            message(talkative, b"{not json"),
            # Refused by the adapter before its msg_id was read: the feedback still names it.
            message(talkative, b'{"msg_id": "str-1", "values": {"temperature": "hot"}}'),
            message(talkative, b'{"msg_id": "ok-1", "values": {"temperature": 1}}'),
            message(talkative, b'{"msg_id": "http-1", "values": {}}', transport="http"),  # HTTP said 400
            message(quiet, bad),
        ],
        profiles=profiles,
    )
    assert result.rejected == 5
    got = [(f.logical_id, f.msg_id, f.reason.split(":")[0]) for f in result.feedback]
    assert got == [
        (talkative.logical_identifier, "bad-1", "schema"),
        (talkative.logical_identifier, None, "malformed JSON"),
        (talkative.logical_identifier, "str-1", "values.temperature is not a number"),
    ], result.feedback
    assert "temperature" in result.feedback[0].reason
    # A redelivery stores nothing new, and is not answered twice.
    again = ingest_batch(messages=[message(talkative, bad)], profiles=profiles)
    assert (again.duplicates, again.feedback) == (1, [])


def test_it_answers_a_device_at_most_its_feedback_burst_then_its_rate() -> None:
    limit = DeviceRateLimit(0.5, 3, counter=None, what="errors_not_sent")
    answered = [limit.allow("DEV-A", 100.0) for _ in range(10)]
    assert answered == [True] * 3 + [False] * 7
    assert limit.allow("DEV-B", 100.0)  # per device
    assert not limit.allow("DEV-A", 101.0)
    assert limit.allow("DEV-A", 102.0)  # 0.5/s: one more after 2 s


def test_it_refuses_to_start_with_unlimited_feedback(settings: Any) -> None:
    settings.ARGUS_DEVICE_ERRORS_RATE = 0
    errors = [m.msg for m in bounds_check()]
    assert errors == ["ARGUS_DEVICE_ERRORS_RATE must be above 0 (is 0)."]


def test_it_ships_the_acl_the_pki_command_writes(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue_server(tmp_path, ["127.0.0.1"])
    # The compose file's bridges (docs/scaling.md: profile `cluster` runs a second one).
    pki.mosquitto_config(tmp_path, bridge_username=["argus-bridge", "argus-bridge-2"])

    def rules(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]

    generated = rules((tmp_path / pki.ACL_FILE).read_text())
    shipped = rules((PROJECT_ROOT / "docker" / "mosquitto" / "acl").read_text())
    assert generated == shipped
    assert "pattern write devices/%u/status" in shipped and "pattern read devices/%u/errors" in shipped


# --------------------------------------------------------------------------- what shows it


@pytest.fixture
def fleet_with_presence(db: None, alpha: TenantPersona) -> dict[str, Device]:
    now = timezone.now()
    with schema_context(alpha.schema):
        device_type = make_device_type(expected_interval_seconds=10)
        up = make_device(device_type, last_seen=now)
        down = make_device(device_type, last_seen=now)
        silent = make_device(device_type, last_seen=now - timedelta(hours=1))
        unknown = make_device(device_type, last_seen=now)
        Device.objects.filter(pk=up.pk).update(online=True, presence_since=now - timedelta(minutes=3))
        Device.objects.filter(pk=down.pk).update(
            online=False, presence_since=now - timedelta(minutes=1), last_disconnect_reason="connection lost"
        )
        Device.objects.filter(pk=silent.pk).update(online=True, presence_since=now - timedelta(hours=2))
    return {"type": device_type, "up": up, "down": down, "silent": silent, "unknown": unknown}  # type: ignore[dict-item]


def test_it_filters_the_device_api_by_presence_and_reports_it(
    fleet_with_presence: dict[str, Device], alpha: TenantPersona
) -> None:
    reader = api_user(alpha)
    f = fleet_with_presence
    kind = f["type"].name

    def ids(**params: str) -> set[str]:
        response = reader.get("/devices/", type=kind, **params)
        assert response.status_code == 200, response.content
        return {d["logical_id"] for d in response.json()["results"]}

    assert ids(online="true") == {f["up"].logical_identifier, f["silent"].logical_identifier}
    assert ids(online="false") == {f["down"].logical_identifier}
    assert ids(inactive="true") == {f["silent"].logical_identifier}
    assert ids(online="true", inactive="false") == {f["up"].logical_identifier}
    body = reader.get(f"/devices/{f['down'].logical_identifier}/").json()
    assert (body["online"], body["last_disconnect_reason"], body["inactive"]) == (False, "connection lost", False)
    assert body["presence_since"] is not None
    unknown = reader.get(f"/devices/{f['unknown'].logical_identifier}/").json()
    assert (unknown["online"], unknown["presence_since"]) == (None, None)
    bad = reader.get("/devices/", online="sometimes")
    assert bad.status_code == 400 and bad["Content-Type"].startswith("application/problem+json")


def test_it_lists_devices_with_presence_in_a_fixed_number_of_queries(db: None, alpha: TenantPersona) -> None:
    reader: ApiUser = api_user(alpha)
    with schema_context(alpha.schema):
        device_type = make_device_type(expected_interval_seconds=10)
        make_device(device_type)
    client = reader.client()
    with CaptureQueriesContext(connection) as few:
        assert client.get(f"{API}/devices/", {"type": device_type.name, "online": "false"}).status_code == 200
    with schema_context(alpha.schema):
        for _ in range(5):
            Device.objects.filter(pk=make_device(device_type).pk).update(online=False)
    with CaptureQueriesContext(connection) as many:
        response = client.get(f"{API}/devices/", {"type": device_type.name, "online": "false"})
        assert len(response.json()["results"]) == 5
    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]


def test_it_shows_presence_in_the_admins_device_list_and_filters_by_it(
    fleet_with_presence: dict[str, Device], alpha: TenantPersona
) -> None:
    f = fleet_with_presence
    client = tenant_admin_client(alpha)
    page = client.get("/admin/devices/device/", {"q": "", "online": "false"})
    assert page.status_code == 200
    html = page.content.decode()
    assert f["down"].logical_identifier in html and "(connection lost)" in html
    assert f["up"].logical_identifier not in html
    inactive = client.get("/admin/devices/device/", {"inactive": "true"}).content.decode()
    assert f["silent"].logical_identifier in inactive and ", inactive" in inactive
    assert f["up"].logical_identifier not in inactive
    form = client.get(f"/admin/devices/device/{f['down'].pk}/change/").content.decode()
    assert "offline since" in form
    type_form = client.get(f"/admin/devices/devicetype/{f['type'].pk}/change/").content.decode()
    assert 'name="expected_interval_seconds"' in type_form and 'name="error_feedback"' in type_form


def test_it_shows_presence_on_the_dashboard_and_in_its_events(
    fleet_with_presence: dict[str, Device], alpha: TenantPersona
) -> None:
    f = fleet_with_presence
    with schema_context(alpha.schema):
        # The most recently heard devices (those of other tests too): ours were heard just now.
        rows = {row["device"].pk: row["presence"] for row in overview().devices}
        silent = presence_text(Device.objects.with_presence().get(pk=f["silent"].pk))
    assert rows[f["down"].pk].startswith("offline since") and rows[f["down"].pk].endswith("(connection lost)")
    assert rows[f["up"].pk].startswith("online since")
    assert rows[f["unknown"].pk] == "unknown"
    assert silent.startswith("online since") and silent.endswith(", inactive")
    page = tenant_admin_client(alpha).get("/dashboard/")
    assert page.status_code == 200
    assert f'<tr data-device="{f["down"].pk}">' in page.content.decode()
    assert 'class="presence" data-online="false">offline since' in page.content.decode()
    event = {"presence": {str(f["up"].pk): {"online": True}, "999999": {"online": False}}}
    assert orjson.loads(_for_page(orjson.dumps(event), frozenset({str(f["up"].pk)}))) == {
        "presence": {str(f["up"].pk): {"online": True}}
    }
    assert orjson.loads(_for_page(orjson.dumps(event), frozenset({"1"}))) == {}


def test_it_exports_devices_online_and_inactive_per_tenant(
    fleet_with_presence: dict[str, Device], alpha: TenantPersona
) -> None:
    with schema_context(alpha.schema):
        online = Device.objects.filter(online=True).count()
        inactive = Device.objects.filter(inactive_condition()).count()
    body = Client().get("/metrics").content.decode()
    assert f'argus_devices_online{{tenant="{alpha.schema}"}} {float(online)}' in body
    assert f'argus_devices_inactive{{tenant="{alpha.schema}"}} {float(inactive)}' in body
    assert online >= 2 and inactive >= 1


# --------------------------------------------------------------------------- end to end


DEVICE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, device = int(sys.argv[1]), sys.argv[2]
    topic = f"devices/{device}/status"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device)
    client.will_set(topic, b'{"state": "offline", "reason": "connection lost"}', qos=1, retain=True)
    client.on_connect = lambda c, u, f, rc, p: c.publish(topic, b'{"state": "online"}', qos=1, retain=True)
    client.connect("127.0.0.1", port, keepalive=5)
    client.loop_forever()
    """
)


def start_device(pipeline: Pipeline, logical_id: str) -> subprocess.Popen[bytes]:
    port = pipeline.mqtt_url.rsplit(":", 1)[1]
    return subprocess.Popen([sys.executable, "-c", DEVICE_SCRIPT, port, logical_id], cwd=PROJECT_ROOT)


@pytest.fixture
def device_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.mark.integration
def test_it_flips_a_device_offline_by_its_last_will_and_back_online(
    pipeline: Pipeline, alpha: TenantPersona, device_processes: list[subprocess.Popen[bytes]]
) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())

    def presence() -> tuple[bool | None, Any, str]:
        with schema_context(alpha.schema):
            return presence_of(device)

    # The simulator as the demo runs it: online when connected, "offline: shutdown" at its end.
    result = run_simulation(
        SimulatorConfig(devices=[device.logical_identifier], mqtt_url=pipeline.mqtt_url, presence=True, messages=2)
    )
    assert result.acked == 2
    wait_for(lambda: presence()[0::2] == (False, "shutdown"), timeout=15, what="the simulator's shutdown")
    device_processes.append(start_device(pipeline, device.logical_identifier))
    wait_for(lambda: presence()[0] is True, timeout=15, what="the device online")
    online_since = presence()[1]
    # Abrupt: no DISCONNECT, the socket just closes; the broker publishes the will.
    os.kill(device_processes[-1].pid, signal.SIGKILL)
    wait_for(lambda: presence()[0] is False, timeout=15, what="the last will stored")
    _, offline_since, reason = presence()
    assert reason == "connection lost" and offline_since > online_since
    device_processes.append(start_device(pipeline, device.logical_identifier))
    wait_for(lambda: presence()[0] is True, timeout=15, what="the device back online")
    assert presence()[1] > offline_since and presence()[2] == "connection lost"
    with schema_context(alpha.schema):
        assert TelemetryRaw.objects.filter(logical_identifier=device.logical_identifier).count() == 2


class ErrorsListener:
    """A device's MQTT client subscribed to its errors topic."""

    def __init__(self, port: int, logical_id: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = queue.Queue[int]()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique_id("errors"))
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.put(mid)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.client.subscribe(f"devices/{logical_id}/errors", qos=1)
        self.subscribed.get(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
def test_it_answers_a_rejected_message_on_its_own_devices_errors_topic(
    pipeline: Pipeline, alpha: TenantPersona
) -> None:
    schema = {"type": "object", "properties": {"values": {"type": "object", "required": ["temperature"]}}}
    with schema_context(alpha.schema):
        device_type = make_device_type(message_schema=schema, error_feedback=True)
        a, b = make_device(device_type), make_device(device_type)
    port = int(pipeline.mqtt_url.rsplit(":", 1)[1])
    listen_a, listen_b = ErrorsListener(port, a.logical_identifier), ErrorsListener(port, b.logical_identifier)
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique_id("sender"))
    sender.connect("127.0.0.1", port)
    sender.loop_start()
    try:
        bad = orjson.dumps({"msg_id": "no-temp-1", "values": {"humidity": 10}})
        sender.publish(f"devices/{a.logical_identifier}/telemetry", bad, qos=1).wait_for_publish(5)
        sender.publish(
            f"devices/{b.logical_identifier}/telemetry", b'{"msg_id": "fine", "values": {"temperature": 1}}', qos=1
        ).wait_for_publish(5)
        answer = listen_a.messages.get(timeout=20)
        assert answer.topic == f"devices/{a.logical_identifier}/errors"
        assert (answer.qos, answer.retain) == (1, False)
        body = orjson.loads(answer.payload)
        assert body["msg_id"] == "no-temp-1" and "temperature" in body["reason"]
        assert set(body) == {"msg_id", "reason", "received_at"}
        with pytest.raises(queue.Empty):
            listen_b.messages.get(timeout=1.0)
        # Not retained: a device subscribing later hears nothing old.
        late = ErrorsListener(port, a.logical_identifier)
        try:
            with pytest.raises(queue.Empty):
                late.messages.get(timeout=0.5)
        finally:
            late.close()
    finally:
        sender.disconnect()
        sender.loop_stop()
        listen_a.close()
        listen_b.close()
    assert "not understood" not in pipeline.bridge.log()
