"""Device identity end to end: `manage.py pki` → a Mosquitto mTLS listener → runbridge (its own
client certificate, mqtts://) → NATS JetStream → runingest → PostgreSQL.

Everything is real: the PKI is made with the `pki` command against the test database, a private
Mosquitto includes the generated listener config the way a deployment does (`include_dir`, with
`per_listener_settings true` next to the plain listener), and devices are paho clients that
present their certificates. Run: `.venv/bin/python -m pytest tests/test_mtls_pipeline.py -q`.
"""

from __future__ import annotations

import io
import queue
import shutil
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from django.core.management import call_command
from django_tenants.utils import schema_context
from paho.mqtt.enums import MQTTProtocolVersion

from devices import pki
from devices.models import Device, DeviceCertificate, DeviceType
from devtools.services import ServerHandle, free_port, start_mosquitto
from telemetry.models import RawStatus, TelemetryHistory, TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type
from tests.pipeline import Pipeline, wait_for
from tests.test_pki_tls import NOT_AUTHORIZED, TIMEOUT, Session, _client

pytestmark = pytest.mark.integration

V311 = MQTTProtocolVersion.MQTTv311
V5 = MQTTProtocolVersion.MQTTv5


@dataclass
class MtlsPlatform:
    """The PKI directory, the broker with its mTLS port, the running pipeline and two devices of alpha."""

    out: Path
    tls_port: int
    broker: ServerHandle
    pipeline: Pipeline
    schema: str
    dev_a: str
    dev_b: str

    def certificate(self, logical_id: str) -> tuple[Path, Path]:
        """Certificate and key files of the device's (only) certificate, as `pki issue-device` wrote them."""
        with schema_context(self.schema):
            record = DeviceCertificate.objects.get(device__logical_identifier=logical_id)
        device_dir = self.out / pki.DEVICES_DIR / logical_id
        return device_dir / f"{record.serial_number}.crt", device_dir / f"{record.serial_number}.key"

    def connect(self, logical_id: str, protocol: MQTTProtocolVersion = V311) -> Session:
        """A device connected over mTLS with its own certificate; fails the test if refused."""
        session = _client(
            self.out / pki.CA_CERT, *self.certificate(logical_id), f"{logical_id}-{protocol.name}", protocol
        )
        session.client.connect("127.0.0.1", self.tls_port, keepalive=30)
        session.client.loop_start()
        if not session.connected.wait(TIMEOUT):
            session.close()
            pytest.fail(f"{logical_id} did not connect: {session.connect_rc} / {session.disconnect_rc}")
        return session

    def refused(self, logical_id: str) -> str:
        """How the broker refused the device's certificate; fails the test if it accepted it."""
        session = _client(self.out / pki.CA_CERT, *self.certificate(logical_id), logical_id)
        try:
            session.client.connect("127.0.0.1", self.tls_port, keepalive=30)
        except (ssl.SSLError, OSError) as exc:
            return f"handshake: {exc}"  # TLS 1.2: the verdict comes inside the handshake
        session.client.loop_start()
        try:
            assert session.closed.wait(TIMEOUT), "the broker neither accepted nor closed the connection"
            assert not session.connected.is_set(), f"{logical_id} was accepted"
            return f"closed: {session.disconnect_rc}"
        finally:
            session.client.loop_stop()

    def reload_broker(self) -> None:
        """SIGHUP Mosquitto (re-reads the CRL) and wait until it has."""
        before = self.broker.log_path.read_text(errors="replace").count("Reloading config")
        self.broker.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: self.broker.log_path.read_text(errors="replace").count("Reloading config") > before,
            timeout=TIMEOUT,
            interval=0.05,
            what="the broker to reload",
        )


def publish(session: Session, logical_id: str, message: dict[str, object]) -> int:
    """Publish at QoS 1 to devices/<logical_id>/telemetry; return the PUBACK's reason code."""
    info = session.client.publish(f"devices/{logical_id}/telemetry", orjson.dumps(message), qos=1)
    return int(session.wait_ack(info.mid).value)


def raw_msg_ids(schema: str, logical_id: str) -> list[str | None]:
    with schema_context(schema):
        return list(
            TelemetryRaw.objects.filter(logical_identifier=logical_id).order_by("id").values_list("msg_id", flat=True)
        )


def pki_command(out: Path, *args: str) -> str:
    stdout = io.StringIO()
    call_command("pki", *args, "--out", str(out), stdout=stdout)
    return stdout.getvalue()


@pytest.fixture
def platform(live_db: None, alpha: TenantPersona, nats_server: ServerHandle, tmp_path: Path) -> Iterator[MtlsPlatform]:
    with schema_context(alpha.schema):
        device_type = make_device_type()
        dev_a = make_device(device_type).logical_identifier
        dev_b = make_device(device_type).logical_identifier
    out, tls_port = tmp_path / "pki", free_port()
    # What an operator runs (docs/device-identity.md), in the same order.
    pki_command(out, "init-ca")
    pki_command(out, "issue-server", "127.0.0.1", "localhost")
    pki_command(out, "issue-client", "argus-bridge")
    for logical_id in (dev_a, dev_b):
        pki_command(out, "issue-device", logical_id, "--tenant", alpha.schema, "--days", "30")
    pki_command(out, "mosquitto-config", "--port", str(tls_port), "--bind", "127.0.0.1")
    conf_d = tmp_path / "mosquitto.d"
    conf_d.mkdir()
    shutil.copy(out / pki.MOSQUITTO_CONF, conf_d / "argus-tls.conf")

    with start_mosquitto(conf_extra=f"include_dir {conf_d}", workdir=tmp_path / "broker") as broker:
        wait_for(lambda: _port_open(tls_port), timeout=TIMEOUT, what="the mTLS listener")
        pipeline = Pipeline(
            broker,
            nats_server,
            tmp_path,
            {
                "ARGUS_BRIDGE_CERT": str(out / pki.CLIENTS_DIR / "argus-bridge.crt"),
                "ARGUS_BRIDGE_KEY": str(out / pki.CLIENTS_DIR / "argus-bridge.key"),
                "ARGUS_BRIDGE_CA": str(out / pki.CA_CERT),
            },
            mqtt_url=f"mqtts://127.0.0.1:{tls_port}",
        )
        try:
            pipeline.start()
            yield MtlsPlatform(out, tls_port, broker, pipeline, alpha.schema, dev_a, dev_b)
        finally:
            pipeline.stop()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def test_it_stores_a_message_a_device_publishes_with_its_certificate(platform: MtlsPlatform) -> None:
    assert f"url=mqtts://127.0.0.1:{platform.tls_port}" in platform.pipeline.bridge.log()
    ts = int(time.time() * 1000)
    device = platform.connect(platform.dev_a)
    try:
        message = {"msg_id": "own-1", "ts": ts, "values": {"temperature": 21.5, "humidity": 40.0}}
        assert publish(device, platform.dev_a, message) == 0
    finally:
        device.close()
    wait_for(lambda: raw_msg_ids(platform.schema, platform.dev_a), what="the raw row")
    with schema_context(platform.schema):
        raw = TelemetryRaw.objects.get(logical_identifier=platform.dev_a)
        assert (raw.status, raw.msg_id, raw.readings, raw.transport) == (RawStatus.ACCEPTED, "own-1", 2, "mqtt")
        assert bytes(raw.payload) == orjson.dumps(message)
        device_id = Device.objects.get(logical_identifier=platform.dev_a).pk
        assert raw.device_id == device_id
        readings = {
            (r.metric, r.value, int(r.time.timestamp() * 1000))
            for r in TelemetryHistory.objects.filter(device_id=device_id)
        }
    assert readings == {("temperature", 21.5, ts), ("humidity", 40.0, ts)}


def test_it_refuses_a_publish_to_another_devices_topic_and_stores_nothing_of_it(platform: MtlsPlatform) -> None:
    a, b = platform.dev_a, platform.dev_b
    # One connection at a time: the client id is the certificate's CN, so a second connection
    # with the same certificate takes the first one's place.
    a5 = platform.connect(a, V5)
    try:
        # MQTT 5: the broker says no. MQTT 3.1.1 cannot say it: PUBACK 0, the message is dropped.
        assert publish(a5, b, {"msg_id": "forged-v5", "values": {"temperature": 99}}) == NOT_AUTHORIZED
    finally:
        a5.close()
    a311 = platform.connect(a, V311)
    try:
        assert publish(a311, b, {"msg_id": "forged-v311", "values": {"temperature": 98}}) == 0
        # Same connection, same QoS, after the forged one: had that been routed, it would be stored first.
        assert publish(a311, a, {"msg_id": "marker-a", "values": {"temperature": 20}}) == 0
    finally:
        a311.close()
    b_session = platform.connect(b)
    try:
        assert publish(b_session, b, {"msg_id": "marker-b", "values": {"temperature": 19}}) == 0
    finally:
        b_session.close()
    wait_for(lambda: raw_msg_ids(platform.schema, a) == ["marker-a"], what="device A's own message")
    wait_for(lambda: raw_msg_ids(platform.schema, b) == ["marker-b"], what="device B's own message")
    time.sleep(0.5)
    assert raw_msg_ids(platform.schema, a) == ["marker-a"]
    assert raw_msg_ids(platform.schema, b) == ["marker-b"]
    with schema_context(platform.schema):
        assert not TelemetryRaw.objects.filter(msg_id__startswith="forged").exists()
        ids = dict(Device.objects.filter(logical_identifier__in=[a, b]).values_list("logical_identifier", "pk"))
        history = {
            logical_id: list(TelemetryHistory.objects.filter(device_id=pk).values_list("metric", "value"))
            for logical_id, pk in ids.items()
        }
    assert history == {a: [("temperature", 20)], b: [("temperature", 19)]}


def test_it_shuts_out_a_revoked_certificate_while_the_other_device_keeps_publishing(platform: MtlsPlatform) -> None:
    a, b = platform.dev_a, platform.dev_b
    device_a = platform.connect(a)
    try:
        assert publish(device_a, a, {"msg_id": "before-revoke", "values": {"temperature": 1}}) == 0
    finally:
        device_a.close()
    wait_for(lambda: raw_msg_ids(platform.schema, a) == ["before-revoke"], what="A's message before revocation")

    output = pki_command(platform.out, "revoke", a, "--tenant", platform.schema, "--reason", "stolen")
    assert "lists" in output and "SIGHUP" in output
    platform.reload_broker()

    log_before = len(platform.broker.log_path.read_text(errors="replace"))
    platform.refused(a)
    # TLS 1.3: the client's side of the handshake completes; the broker's verdict closes the socket.
    assert "certificate verify failed" in platform.broker.log_path.read_text(errors="replace")[log_before:]
    device_b = platform.connect(b)
    try:
        assert publish(device_b, b, {"msg_id": "after-revoke", "values": {"temperature": 2}}) == 0
    finally:
        device_b.close()
    wait_for(lambda: raw_msg_ids(platform.schema, b) == ["after-revoke"], what="B's message after A's revocation")
    assert raw_msg_ids(platform.schema, a) == ["before-revoke"]
    # The bridge's own certificate is unaffected: it stayed subscribed through the reload.
    assert platform.pipeline.bridge.running()


# --- Presence and feedback (issue 17) under the shipped ACL ------------------------------------


def presence(schema: str, logical_id: str) -> tuple[bool | None, object, str]:
    with schema_context(schema):
        device = Device.objects.get(logical_identifier=logical_id)
    return device.online, device.presence_since, device.last_disconnect_reason


def publish_status(session: Session, logical_id: str, payload: bytes) -> int:
    info = session.client.publish(f"devices/{logical_id}/status", payload, qos=1, retain=True)
    return int(session.wait_ack(info.mid).value)


def test_it_keeps_a_device_from_writing_another_devices_status(platform: MtlsPlatform) -> None:
    a, b = platform.dev_a, platform.dev_b
    b_session = platform.connect(b)
    try:
        assert publish_status(b_session, b, b'{"state": "online"}') == 0
        wait_for(lambda: presence(platform.schema, b)[0] is True, what="B online")
    finally:
        # Gone without a word (no will, no "offline"): B's presence stays online.
        b_session.close()
    before = presence(platform.schema, b)
    forged = b'{"state": "offline", "reason": "forged"}'
    a5 = platform.connect(a, V5)
    try:
        assert publish_status(a5, b, forged) == NOT_AUTHORIZED
    finally:
        a5.close()
    # A last will on B's topic, and an abrupt end that would fire it.
    will = _client(platform.out / pki.CA_CERT, *platform.certificate(a), a, V311)
    will.client.will_set(f"devices/{b}/status", forged, qos=1, retain=True)
    will.client.connect("127.0.0.1", platform.tls_port, keepalive=30)
    will.client.loop_start()
    try:
        # Mosquitto 2.0.11 accepts the CONNECT and checks the will's topic when it publishes it.
        assert will.connected.wait(TIMEOUT), will.connect_rc
        sock = will.client.socket()
        assert isinstance(sock, ssl.SSLSocket)
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        will.client.loop_stop()
    a311 = platform.connect(a, V311)
    try:
        # MQTT 3.1.1 cannot say no: acknowledged, and dropped.
        assert publish_status(a311, b, forged) == 0
        # Then A's own status, on the same connection: once it is stored, anything before it was too.
        assert publish_status(a311, a, b'{"state": "online"}') == 0
    finally:
        a311.close()
    wait_for(lambda: presence(platform.schema, a)[0] is True, what="A's own status")
    time.sleep(0.5)
    assert presence(platform.schema, b) == before
    assert "forged" not in platform.pipeline.ingest.log()


def test_it_answers_a_rejection_on_the_errors_topic_of_its_own_device_only(platform: MtlsPlatform) -> None:
    a, b = platform.dev_a, platform.dev_b
    with schema_context(platform.schema):
        DeviceType.objects.filter(devices__logical_identifier=a).update(error_feedback=True)
    eavesdropper = platform.connect(b, V5)
    device = platform.connect(a, V5)
    try:
        # Mosquitto grants the SUBSCRIBE and enforces `read` per message (see test_pki_tls).
        eavesdropper.client.subscribe([(f"devices/{a}/errors", 1), (f"devices/{b}/errors", 1), ("devices/+/errors", 1)])
        eavesdropper.granted.get(timeout=TIMEOUT)
        device.client.subscribe(f"devices/{a}/errors", qos=1)
        assert not device.granted.get(timeout=TIMEOUT)[0].is_failure
        assert publish(device, a, {"msg_id": "hot-1", "values": {"temperature": "hot"}}) == 0
        answer = device.messages.get(timeout=20)
        assert answer.topic == f"devices/{a}/errors" and answer.qos == 1 and not answer.retain
        body = orjson.loads(answer.payload)
        assert body["msg_id"] == "hot-1" and "temperature" in body["reason"]
        with pytest.raises(queue.Empty):
            eavesdropper.messages.get(timeout=1.0)
    finally:
        device.close()
        eavesdropper.close()
    with schema_context(platform.schema):
        raw = TelemetryRaw.objects.get(logical_identifier=a)
    assert raw.status == RawStatus.REJECTED and raw.reason == body["reason"]
