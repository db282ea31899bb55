"""Device PKI: unit tests for devices.pki and end-to-end mutual TLS against a real Mosquitto.

The TLS tests start a private Mosquitto on a free port; the last test drives `manage.py pki`
against the test database. Run: `.venv/bin/python -m pytest tests/test_pki_tls.py -q`.
"""

from __future__ import annotations

import getpass
import io
import os
import queue
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from django.core.management import call_command
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from devices import pki
from devices.models import DeviceCertificate
from tests.conftest import make_device, make_device_type

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TIMEOUT = 5.0
NOT_AUTHORIZED = 0x87


# --------------------------------------------------------------------------- fixtures


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    """A freshly generated CA directory with a broker, two devices and the bridge client."""

    out: Path
    port: int
    server: pki.CertBundle
    dev1: pki.IssuedCert
    dev2: pki.IssuedCert
    bridge: pki.CertBundle


@pytest.fixture
def pki_dir(tmp_path: Path) -> Pki:
    out = tmp_path / "pki"
    port = _free_port()
    pki.init_ca(out)
    server = pki.issue_server(out, ["127.0.0.1", "localhost"])
    dev1 = pki.issue_device(out, "DEV-0001", days=30)
    dev2 = pki.issue_device(out, "DEV-0002", days=30)
    bridge = pki.issue_client(out, "argus-bridge")
    pki.mosquitto_config(out, port=port, bind="127.0.0.1")
    return Pki(out=out, port=port, server=server, dev1=dev1, dev2=dev2, bridge=bridge)


class Broker:
    """A private Mosquitto that includes the generated TLS listener, as a deployment would."""

    def __init__(self, workdir: Path, listener_conf: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "mosquitto.log"
        conf_d = workdir / "conf.d"
        conf_d.mkdir(parents=True, exist_ok=True)
        shutil.copy(listener_conf, conf_d / "argus-tls.conf")
        self.conf_path = workdir / "mosquitto.conf"
        # per_listener_settings true is how the listener block is meant to be combined with a
        # plain listener. `user` keeps the current user: started as root, Mosquitto 2.0 would
        # drop to `mosquitto` before reading the 0600 server key and ACL and fail to start.
        self.conf_path.write_text(
            "per_listener_settings true\n"
            f"user {getpass.getuser()}\n"
            "persistence false\n"
            f"log_dest file {self.log_path}\n"
            "log_type all\n"
            f"include_dir {conf_d}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int) -> None:
        """Start mosquitto and wait until its TLS port accepts connections."""
        # stdout is block-buffered when redirected, so the broker logs to a file it flushes.
        with (self.workdir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf_path)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
            if "running" in self.log():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start:\n{self.log()}")

    def stop(self) -> None:
        """Stop mosquitto; kill it if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(TIMEOUT)

    def restart(self, port: int) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start(port)

    def log(self) -> str:
        """Return everything the broker has logged so far."""
        paths = [self.workdir / "stdout.log", self.log_path]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())


@pytest.fixture
def broker(pki_dir: Pki, tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker", pki_dir.out / pki.MOSQUITTO_CONF)
    try:
        b.start(pki_dir.port)
        yield b
    finally:
        b.stop()


# --------------------------------------------------------------------------- MQTT helpers


@dataclass
class Session:
    """A paho client plus what its callbacks observed."""

    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)
    connect_rc: Any = None
    disconnect_rc: Any = None
    messages: queue.Queue[mqtt.MQTTMessage] = field(default_factory=queue.Queue)
    acks: dict[int, Any] = field(default_factory=dict)
    acked: threading.Condition = field(default_factory=threading.Condition)
    granted: queue.Queue[list[Any]] = field(default_factory=queue.Queue)

    def wait_ack(self, mid: int) -> Any:
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, TIMEOUT), f"no PUBACK for mid {mid}"
            return self.acks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _client(
    ca: Path,
    cert: Path | None,
    key: Path | None,
    client_id: str,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
) -> Session:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    # Clients verify the broker against our CA and check its IP SAN, as real devices must.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    client.tls_set_context(ctx)
    client.reconnect_delay_set(60, 60)  # a refused client must not quietly retry during the test
    session = Session(client)

    def on_connect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        session.connect_rc = rc
        if not rc.is_failure:
            session.connected.set()

    def on_disconnect(c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        session.disconnect_rc = rc
        session.closed.set()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        session.messages.put(msg)

    def on_publish(c: mqtt.Client, u: Any, mid: int, rc: Any, props: Any) -> None:
        with session.acked:
            session.acks[mid] = rc
            session.acked.notify_all()

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: list[Any], props: Any) -> None:
        session.granted.put(rcs)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    return session


def connect(
    p: Pki,
    cert: Path | None,
    key: Path | None,
    client_id: str,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
) -> Session:
    """Connect over mTLS and wait for a successful CONNACK; fail the test otherwise."""
    session = _client(p.out / pki.CA_CERT, cert, key, client_id, protocol)
    session.client.connect("127.0.0.1", p.port, keepalive=30)
    session.client.loop_start()
    if not session.connected.wait(TIMEOUT):
        session.close()
        pytest.fail(f"{client_id} did not connect: connack={session.connect_rc} disconnect={session.disconnect_rc}")
    return session


def refused(p: Pki, cert: Path | None, key: Path | None, client_id: str, ca: Path | None = None) -> str:
    """Try to connect and return how the broker refused; fail the test if it accepted the client."""
    session = _client(ca or p.out / pki.CA_CERT, cert, key, client_id)
    try:
        session.client.connect("127.0.0.1", p.port, keepalive=30)
    except (ssl.SSLError, OSError) as exc:
        # TLS 1.2: the broker's verdict on the client certificate arrives inside the handshake.
        return f"handshake: {exc}"
    session.client.loop_start()
    try:
        # TLS 1.3: the client finishes its side first; the broker's alert arrives on the first read.
        assert session.closed.wait(TIMEOUT), "broker neither accepted nor closed the connection"
        assert not session.connected.is_set(), f"{client_id} was accepted"
        return f"closed: {session.disconnect_rc}"
    finally:
        session.client.loop_stop()


def device(c: pki.CertBundle) -> tuple[Path, Path]:
    return c.cert_path, c.key_path


def topic(logical_id: str) -> str:
    return f"devices/{logical_id}/telemetry"


def bridge_subscriber(p: Pki, protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311) -> Session:
    bridge = connect(p, *device(p.bridge), "argus-bridge", protocol)
    bridge.client.subscribe("devices/+/telemetry", qos=1)
    granted = bridge.granted.get(timeout=TIMEOUT)
    assert not granted[0].is_failure, f"bridge subscription refused: {granted}"
    return bridge


# --------------------------------------------------------------------------- unit tests


def test_it_writes_private_keys_with_mode_0600(pki_dir: Pki) -> None:
    keys = [pki_dir.out / pki.CA_KEY, pki_dir.server.key_path, pki_dir.dev1.key_path, pki_dir.bridge.key_path]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_it_creates_a_ca_certificate_that_can_sign(pki_dir: Pki) -> None:
    ca = pki.load_ca_certificate(pki_dir.out)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert pki.common_name(ca) == "Argus Device CA"


def test_it_refuses_to_overwrite_an_existing_ca(pki_dir: Pki) -> None:
    before = (pki_dir.out / pki.CA_CERT).read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.init_ca(pki_dir.out)
    assert (pki_dir.out / pki.CA_CERT).read_bytes() == before
    pki.init_ca(pki_dir.out, force=True)
    assert (pki_dir.out / pki.CA_CERT).read_bytes() != before


def test_it_puts_dns_and_ip_sans_on_the_server_certificate(pki_dir: Pki) -> None:
    cert = pki.load_certificate(pki_dir.server.pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_it_issues_device_certificates_named_after_the_logical_id(pki_dir: Pki) -> None:
    issued = pki_dir.dev1
    cert = pki.load_certificate(issued.pem)
    assert pki.common_name(cert) == issued.subject_cn == "DEV-0001"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert issued.serial == format(cert.serial_number, "x")
    assert issued.fingerprint_sha256 == pki.fingerprint(cert) and len(issued.fingerprint_sha256) == 64
    assert issued.not_before.tzinfo is not None and issued.not_after.tzinfo is not None
    assert timedelta(days=29) < issued.not_after - datetime.now(UTC) <= timedelta(days=30)
    assert issued.cert_path == pki_dir.out / "devices" / "DEV-0001" / f"{issued.serial}.crt"
    assert issued.key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pki.verify_device_certificate(cert, pki.load_ca_certificate(pki_dir.out))


def test_it_keeps_every_certificate_of_a_device_for_rotation(pki_dir: Pki) -> None:
    second = pki.issue_device(pki_dir.out, "DEV-0001", days=30)
    assert second.serial != pki_dir.dev1.serial
    assert pki_dir.dev1.cert_path.exists() and second.cert_path.exists()


def test_it_rejects_names_that_would_break_topics_or_paths(pki_dir: Pki) -> None:
    for bad in ["a/b", "dev+", "dev#", "../x", "", "x" * 65, "bad name"]:
        with pytest.raises(pki.PkiError, match="invalid name"):
            pki.issue_device(pki_dir.out, bad, days=1)
    with pytest.raises(pki.PkiError, match="service client"):
        pki.issue_device(pki_dir.out, "argus-bridge", days=1)


def test_it_lists_revoked_serials_in_the_crl(pki_dir: Pki) -> None:
    revoked_at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    path = pki.build_crl(pki_dir.out, [(pki_dir.dev1.serial.upper(), revoked_at)], days=7)
    crl = pki.load_crl(path)
    ca = pki.load_ca_certificate(pki_dir.out)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    entry = crl.get_revoked_certificate_by_serial_number(int(pki_dir.dev1.serial, 16))
    assert entry is not None and entry.revocation_date_utc == revoked_at
    assert crl.get_revoked_certificate_by_serial_number(int(pki_dir.dev2.serial, 16)) is None
    assert crl.next_update_utc is not None and crl.next_update_utc - datetime.now(UTC) <= timedelta(days=7)


def test_it_round_trips_a_passphrase_protected_ca_key(tmp_path: Path) -> None:
    out = tmp_path / "enc"
    pki.init_ca(out, passphrase=b"s3cret")
    assert b"ENCRYPTED" in (out / pki.CA_KEY).read_bytes()
    with pytest.raises(pki.PkiError, match="passphrase"):
        pki.issue_device(out, "DEV-9", days=1)
    with pytest.raises(pki.PkiError, match="passphrase"):
        pki.issue_device(out, "DEV-9", days=1, passphrase=b"wrong")
    issued = pki.issue_device(out, "DEV-9", days=1, passphrase=b"s3cret")
    pki.verify_device_certificate(pki.load_certificate(issued.pem), pki.load_ca_certificate(out))
    # Keys handed to devices are never encrypted with the CA passphrase.
    serialization.load_pem_private_key(issued.key_path.read_bytes(), password=None)


def test_it_rejects_foreign_expired_and_non_client_certificates(pki_dir: Pki, tmp_path: Path) -> None:
    ca = pki.load_ca_certificate(pki_dir.out)
    pki.init_ca(tmp_path / "rogue")
    rogue = pki.issue_device(tmp_path / "rogue", "DEV-0001", days=30)
    with pytest.raises(pki.CertificateVerificationError, match=r"not issued by|signature"):
        pki.verify_device_certificate(pki.load_certificate(rogue.pem), ca)
    now = datetime.now(UTC)
    old = pki.issue_device(
        pki_dir.out, "DEV-0001", days=1, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )
    with pytest.raises(pki.CertificateVerificationError, match="expired"):
        pki.verify_device_certificate(pki.load_certificate(old.pem), ca)
    with pytest.raises(pki.CertificateVerificationError, match="client"):
        pki.verify_device_certificate(pki.load_certificate(pki_dir.server.pem), ca)


def test_it_writes_a_listener_block_with_absolute_paths_and_an_acl(pki_dir: Pki) -> None:
    conf = (pki_dir.out / pki.MOSQUITTO_CONF).read_text().splitlines()
    assert f"listener {pki_dir.port} 127.0.0.1" in conf
    options = dict(line.split(" ", 1) for line in conf if line and not line.startswith("#"))
    for name in ("cafile", "certfile", "keyfile", "crlfile", "acl_file"):
        assert Path(options[name]).is_absolute() and Path(options[name]).exists(), name
    assert options["require_certificate"] == "true"
    assert options["use_identity_as_username"] == "true"
    acl = (pki_dir.out / pki.ACL_FILE).read_text()
    assert "pattern write devices/%u/telemetry" in acl
    assert "user argus-bridge\ntopic read devices/+/telemetry" in acl


# --------------------------------------------------------------------------- real broker


@pytest.mark.integration
def test_it_delivers_a_device_message_on_its_own_topic_to_the_bridge(pki_dir: Pki, broker: Broker) -> None:
    bridge = bridge_subscriber(pki_dir)
    dev = connect(pki_dir, *device(pki_dir.dev1), "DEV-0001")
    try:
        info = dev.client.publish(topic("DEV-0001"), b'{"values": {"t": 21.5}}', qos=1)
        dev.wait_ack(info.mid)
        msg = bridge.messages.get(timeout=TIMEOUT)
        assert msg.topic == "devices/DEV-0001/telemetry"
        assert msg.payload == b'{"values": {"t": 21.5}}'
    finally:
        dev.close()
        bridge.close()


@pytest.mark.integration
def test_it_drops_a_device_publish_to_another_devices_topic_silently_in_mqtt311(pki_dir: Pki, broker: Broker) -> None:
    bridge = bridge_subscriber(pki_dir)
    dev2 = connect(pki_dir, *device(pki_dir.dev2), "DEV-0002")
    try:
        forged = dev2.client.publish(topic("DEV-0001"), b"forged", qos=1)
        # MQTT 3.1.1 has no way to say "not authorised": the broker still acknowledges.
        assert not dev2.wait_ack(forged.mid).is_failure
        own = dev2.client.publish(topic("DEV-0002"), b"marker", qos=1)
        dev2.wait_ack(own.mid)
        # Same connection, same QoS: had the forged message been routed it would arrive first.
        msg = bridge.messages.get(timeout=TIMEOUT)
        assert (msg.topic, msg.payload) == ("devices/DEV-0002/telemetry", b"marker")
        assert bridge.messages.empty()
        assert dev2.client.is_connected()
    finally:
        dev2.close()
        bridge.close()


@pytest.mark.integration
def test_it_refuses_forged_publishes_with_0x87_in_mqtt5(pki_dir: Pki, broker: Broker) -> None:
    v5 = MQTTProtocolVersion.MQTTv5
    bridge = bridge_subscriber(pki_dir, v5)
    dev2 = connect(pki_dir, *device(pki_dir.dev2), "DEV-0002", v5)
    try:
        forged = dev2.client.publish(topic("DEV-0001"), b"forged", qos=1)
        assert dev2.wait_ack(forged.mid).value == NOT_AUTHORIZED
        # The bridge only reads.
        from_bridge = bridge.client.publish(topic("DEV-0001"), b"from-bridge", qos=1)
        assert bridge.wait_ack(from_bridge.mid).value == NOT_AUTHORIZED
        own = dev2.client.publish(topic("DEV-0002"), b"marker", qos=1)
        assert not dev2.wait_ack(own.mid).is_failure
        msg = bridge.messages.get(timeout=TIMEOUT)
        assert (msg.topic, msg.payload) == ("devices/DEV-0002/telemetry", b"marker")
        assert bridge.messages.empty()
    finally:
        dev2.close()
        bridge.close()


@pytest.mark.integration
def test_it_never_delivers_other_devices_telemetry_to_a_device(pki_dir: Pki, broker: Broker) -> None:
    v5 = MQTTProtocolVersion.MQTTv5
    bridge = bridge_subscriber(pki_dir, v5)
    dev1 = connect(pki_dir, *device(pki_dir.dev1), "DEV-0001", v5)
    dev2 = connect(pki_dir, *device(pki_dir.dev2), "DEV-0002", v5)
    try:
        # Mosquitto 2.0.11's acl_file grants the SUBSCRIBE itself (no 0x87 in the SUBACK) and
        # enforces `read` per message at delivery instead.
        dev2.client.subscribe("devices/+/telemetry", qos=1)
        assert not dev2.granted.get(timeout=TIMEOUT)[0].is_failure
        info = dev1.client.publish(topic("DEV-0001"), b"private", qos=1)
        dev1.wait_ack(info.mid)
        assert bridge.messages.get(timeout=TIMEOUT).payload == b"private"
        with pytest.raises(queue.Empty):
            dev2.messages.get(timeout=0.5)
    finally:
        dev1.close()
        dev2.close()
        bridge.close()


@pytest.mark.integration
def test_it_refuses_a_client_without_a_certificate(pki_dir: Pki, broker: Broker) -> None:
    refused(pki_dir, None, None, "anonymous")


@pytest.mark.integration
def test_it_refuses_a_certificate_from_another_ca(pki_dir: Pki, broker: Broker, tmp_path: Path) -> None:
    rogue_dir = tmp_path / "rogue"
    pki.init_ca(rogue_dir)
    # Same CN as a real device: the CA, not the name, decides.
    rogue = pki.issue_device(rogue_dir, "DEV-0001", days=30)
    refused(pki_dir, *device(rogue), "DEV-0001")


@pytest.mark.integration
def test_it_refuses_an_expired_certificate(pki_dir: Pki, broker: Broker) -> None:
    now = datetime.now(UTC)
    expired = pki.issue_device(
        pki_dir.out, "DEV-0001", days=1, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
    )
    refused(pki_dir, *device(expired), "DEV-0001")


@pytest.mark.integration
def test_it_refuses_a_server_certificate_used_as_a_client(pki_dir: Pki, broker: Broker) -> None:
    refused(pki_dir, *device(pki_dir.server), "127.0.0.1")


def _reload(broker: Broker) -> None:
    """SIGHUP the broker and wait until it has re-read its configuration."""
    assert broker.proc is not None
    before = broker.log().count("Reloading config")
    broker.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while broker.log().count("Reloading config") == before:
        assert time.monotonic() < deadline, "broker did not reload"
        time.sleep(0.05)
    # The broker is single-threaded: connections made from now on are handled after the reload.


@pytest.mark.integration
def test_it_refuses_a_revoked_certificate_after_a_sighup(pki_dir: Pki, broker: Broker) -> None:
    connect(pki_dir, *device(pki_dir.dev1), "DEV-0001").close()
    pki.build_crl(pki_dir.out, [(pki_dir.dev1.serial, datetime.now(UTC))])
    # Mosquitto 2.0.11 re-reads crlfile on SIGHUP (the man page only promises cert and key).
    _reload(broker)
    refused(pki_dir, *device(pki_dir.dev1), "DEV-0001")
    # Other devices, and the same device's newly issued certificate, keep working.
    connect(pki_dir, *device(pki_dir.dev2), "DEV-0002").close()
    rotated = pki.issue_device(pki_dir.out, "DEV-0001", days=30)
    connect(pki_dir, *device(rotated), "DEV-0001").close()


@pytest.mark.integration
def test_it_refuses_a_revoked_certificate_after_a_restart(pki_dir: Pki, broker: Broker) -> None:
    pki.build_crl(pki_dir.out, [(pki_dir.dev1.serial, datetime.now(UTC))])
    broker.restart(pki_dir.port)
    refused(pki_dir, *device(pki_dir.dev1), "DEV-0001")
    connect(pki_dir, *device(pki_dir.dev2), "DEV-0002").close()


@pytest.mark.integration
def test_it_locks_everyone_out_once_the_crl_has_expired(pki_dir: Pki, broker: Broker) -> None:
    # Why `pki crl` must run on a schedule: OpenSSL treats a stale CRL as a verification failure.
    pki.build_crl(pki_dir.out, [], days=1, last_update=datetime.now(UTC) - timedelta(days=2))
    _reload(broker)
    refused(pki_dir, *device(pki_dir.dev2), "DEV-0002")


def test_it_leaves_no_temp_files_behind(pki_dir: Pki) -> None:
    # Atomic writes leave no temp files behind next to the broker's files.
    assert not [p for p in pki_dir.out.rglob(".*") if p.is_file()]
    assert os.access(pki_dir.out / pki.MOSQUITTO_CONF, os.R_OK)


# --------------------------------------------------------------------------- the command (database)


def test_it_issues_revokes_and_publishes_device_certificates_through_the_command(in_alpha: Any, tmp_path: Path) -> None:
    out = tmp_path / "pki"
    dev = make_device(make_device_type())
    call_command("pki", "init-ca", "--out", str(out), stdout=io.StringIO())
    for _ in range(2):  # rotation: two valid certificates at once
        call_command("pki", "issue-device", dev.logical_identifier, "--out", str(out), stdout=io.StringIO())
    certs = list(DeviceCertificate.objects.filter(device=dev).order_by("created_at", "pk"))
    assert len(certs) == 2 and all(c.revoked_at is None for c in certs)
    ca = pki.load_ca_certificate(out)
    for c in certs:
        pki.verify_device_certificate(pki.load_certificate(c.pem), ca)
        assert c.subject_cn == dev.logical_identifier

    call_command(
        "pki",
        "revoke",
        dev.logical_identifier,
        "--serial",
        certs[0].serial_number.upper(),
        "--out",
        str(out),
        stdout=io.StringIO(),
    )
    crl = pki.load_crl(out / pki.CRL_FILE)
    assert crl.get_revoked_certificate_by_serial_number(int(certs[0].serial_number, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(certs[1].serial_number, 16)) is None

    call_command("pki", "revoke", dev.logical_identifier, "--out", str(out), stdout=io.StringIO())
    assert not DeviceCertificate.objects.filter(device=dev, revoked_at__isnull=True).exists()
    call_command("pki", "crl", "--out", str(out), stdout=io.StringIO())
    crl = pki.load_crl(out / pki.CRL_FILE)
    assert all(crl.get_revoked_certificate_by_serial_number(int(c.serial_number, 16)) for c in certs)
