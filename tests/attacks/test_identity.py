"""Attacks on device identity (issue 10, items 2, 5 and 6), against the real broker and pipeline.

- A device certificate connecting with the bridge's client id (or another device's) must not
  take over that session: on the mTLS listener the client id is the certificate's CN.
- No device may be named like a platform service (the bridge's CN and client id), and no
  device name can widen an ACL pattern.
- A renamed or deleted device's certificates are revoked, and stay in the CRL after the device
  row is gone, so a logical id reused by another tenant does not inherit them.
- The CRL is renewed by a Celery beat task before it runs out, the broker is reloaded by the
  configured hook, and /readyz fails while the CRL runs out within a day.

The live tests reuse tests/test_mtls_pipeline.py's platform: `manage.py pki` output included
into a private Mosquitto started from the shipped config, runbridge over mqtts:// with its own
client certificate, runingest, the test database. Run:
`.venv/bin/python -m pytest tests/attacks/test_identity.py -q`.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.test import Client
from django_tenants.utils import schema_context
from pytest_django.fixtures import SettingsWrapper

from devices import pki
from devices.models import Device
from telemetry.models import TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id
from tests.pipeline import wait_for
from tests.test_mtls_pipeline import MtlsPlatform, pki_command, platform, publish, raw_msg_ids  # noqa: F401
from tests.test_pki_tls import TIMEOUT, Session, _client

DOCKER_MOSQUITTO_CONF = Path(__file__).resolve().parents[2] / "docker" / "mosquitto" / "mosquitto.conf"


@pytest.fixture
def mtls(platform: MtlsPlatform) -> MtlsPlatform:  # noqa: F811 - the imported fixture
    """tests/test_mtls_pipeline.py's platform (broker with the mTLS listener, bridge, ingest)."""
    return platform


# --------------------------------------------------------------------------- helpers


def _new_device_with_certificate(mtls: MtlsPlatform, prefix: str) -> str:
    """A device of alpha (the mtls's device type) with a certificate from `pki issue-device`."""
    with schema_context(mtls.schema):
        device_type = Device.objects.get(logical_identifier=mtls.dev_a).device_type
        logical_id = make_device(device_type, logical_identifier=unique_id(prefix)).logical_identifier
    pki_command(mtls.out, "issue-device", logical_id, "--tenant", mtls.schema, "--days", "30")
    return logical_id


class Hijacker:
    """A device connected with its own certificate but asking for someone else's client id.

    Thrown off, it is back within 0.2 s (sooner than the bridge's own reconnect), subscribes to
    what the bridge's session would hold, and counts how often it was disconnected."""

    def __init__(self, mtls: MtlsPlatform, logical_id: str, client_id: str) -> None:
        self.client_id = client_id
        self.session: Session = _client(mtls.out / pki.CA_CERT, *mtls.certificate(logical_id), client_id)
        self.disconnects = 0
        self.connects = 0
        self._stop = threading.Event()
        client = self.session.client
        on_connect, on_disconnect = client.on_connect, client.on_disconnect

        def counting_connect(c: Any, *args: Any) -> None:
            self.connects += 1
            on_connect(c, *args)  # type: ignore[misc]
            c.subscribe("devices/+/telemetry", qos=1)

        def counting_disconnect(*args: Any) -> None:
            self.disconnects += 1
            on_disconnect(*args)  # type: ignore[misc]

        client.on_connect = counting_connect
        client.on_disconnect = counting_disconnect
        client.connect("127.0.0.1", mtls.tls_port, keepalive=30)
        self._thread = threading.Thread(target=self._run, name=f"hijacker-{client_id}", daemon=True)
        self._thread.start()
        assert self.session.connected.wait(TIMEOUT), f"hijacker {client_id} was not even let in"

    def _run(self) -> None:
        client = self.session.client
        while not self._stop.is_set():
            if client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS and not self._stop.is_set():
                time.sleep(0.2)
                try:
                    client.reconnect()
                except OSError:
                    continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.session.client.disconnect()


def _write_pid_file(mtls: MtlsPlatform, path: Path) -> Path:
    path.write_text(f"{mtls.broker.pid}\n")
    return path


def _reloads(mtls: MtlsPlatform) -> int:
    return mtls.broker.log_path.read_text(errors="replace").count("Reloading config")


# --------------------------------------------------------------------------- item 2: client ids


def test_it_keeps_every_message_while_devices_connect_with_the_bridges_client_id(mtls: MtlsPlatform) -> None:
    bridge_client_id = mtls.pipeline.env["ARGUS_BRIDGE_CLIENT_ID"]
    publisher_id = mtls.dev_a
    # The bridge's configured client id, its certificate's CN, and the publishing device's id.
    hijackers = [
        Hijacker(mtls, mtls.dev_b, bridge_client_id),
        Hijacker(mtls, _new_device_with_certificate(mtls, "HIJACK"), "argus-bridge"),
        Hijacker(mtls, _new_device_with_certificate(mtls, "HIJACK"), publisher_id),
    ]
    device = None
    try:
        time.sleep(1.0)  # let a thrown-off bridge and its hijacker fight it out, as they would
        device = mtls.connect(publisher_id)
        device_drops = 0

        def count_drop(*args: Any) -> None:
            nonlocal device_drops
            device_drops += 1

        device.client.on_disconnect = count_drop
        device.client.reconnect_delay_set(1, 1)
        infos = [
            device.client.publish(
                f"devices/{publisher_id}/telemetry",
                orjson.dumps({"msg_id": f"m-{i}", "values": {"temperature": i % 40}}),
                qos=1,
            )
            for i in range(300)
        ]
        for info in infos:
            info.wait_for_publish(30)
        stored = wait_for(
            lambda: len(set(raw_msg_ids(mtls.schema, publisher_id))) == 300 or None,
            timeout=60,
            what=lambda: f"300 stored messages (have {len(set(raw_msg_ids(mtls.schema, publisher_id)))})",
        )
        assert stored
        # Nobody was thrown off: not the bridge, not the publisher, not the hijackers themselves
        # (each got its own CN as client id, so no two connections shared one).
        assert device_drops == 0
        assert [(h.client_id, h.disconnects, h.connects) for h in hijackers] == [(h.client_id, 0, 1) for h in hijackers]
        assert mtls.pipeline.bridge.log().count("mqtt connected") == 1, mtls.pipeline.bridge.log()
        assert "mqtt disconnected" not in mtls.pipeline.bridge.log()
    finally:
        if device is not None:
            device.close()
        for hijacker in hijackers:
            hijacker.close()
    assert sorted(str(m) for m in raw_msg_ids(mtls.schema, publisher_id)) == sorted(f"m-{i}" for i in range(300))


def test_it_binds_the_client_id_to_the_username_on_every_authenticated_shipped_listener() -> None:
    listeners: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in DOCKER_MOSQUITTO_CONF.read_text().splitlines():
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if tokens[0] == "listener":
            current = listeners.setdefault(tokens[1], {})
        elif current is not None:
            current[tokens[0]] = " ".join(tokens[1:])
    authenticated = {port: d for port, d in listeners.items() if d.get("allow_anonymous") == "false"}
    assert set(authenticated) == {"8883"}
    assert {port: d.get("use_username_as_clientid") for port, d in authenticated.items()} == {"8883": "true"}
    # The WebSocket listener, which had no working authentication, is gone.
    assert not any(d.get("protocol") == "websockets" for d in listeners.values())


def test_it_writes_the_client_id_binding_into_the_generated_listener(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    pki.init_ca(out)
    pki.issue_server(out, ["127.0.0.1"])
    conf = pki.mosquitto_config(out, port=18883, bridge_username=["argus-bridge", "argus-bridge-2"])
    lines = conf.read_text().splitlines()
    assert "use_username_as_clientid true" in lines and "use_identity_as_username true" in lines
    acl = (out / pki.ACL_FILE).read_text()
    assert acl.count("topic read devices/+/telemetry") == 2
    # A device directory named like a bridge must not be granted the bridge's rights.
    (out / pki.DEVICES_DIR / "DEV-X").mkdir(parents=True)
    with pytest.raises(pki.PkiError, match="device identity"):
        pki.mosquitto_config(out, bridge_username="DEV-X")


@pytest.mark.parametrize("name", ["argus-bridge", "argus-bridge-1", "ARGUS-Bridge", "argus-anything"])
def test_it_refuses_a_device_named_like_a_platform_service(in_alpha: TenantPersona, tmp_path: Path, name: str) -> None:
    device_type = make_device_type()
    with pytest.raises(ValidationError, match="reserved"):
        Device(device_type=device_type, name="x", logical_identifier=name).full_clean()
    # Not only forms: creating the row (provisioning, scripts) is refused too.
    with pytest.raises(IntegrityError, match="Reserved"), transaction.atomic():
        Device.objects.create(device_type=device_type, name="x", logical_identifier=name)
    # Nor can the CA be made to issue a certificate with that CN.
    out = tmp_path / "pki"
    pki.init_ca(out)
    with pytest.raises(pki.PkiError, match="reserved"):
        pki.issue_device(out, name, days=1)


def test_it_refuses_the_configured_bridge_client_id_as_a_device_name(
    in_alpha: TenantPersona, settings: SettingsWrapper
) -> None:
    settings.ARGUS_BRIDGE_CLIENT_ID = "ingest-bridge-7"
    with pytest.raises(ValidationError, match="reserved"):
        Device(device_type=make_device_type(), name="x", logical_identifier="ingest-bridge-7").full_clean()


@pytest.mark.parametrize("name", ["+", "#", "a/#", "dev/+", "a+b", "%u", "dev#1"])
def test_it_refuses_names_that_would_widen_an_acl_pattern(in_alpha: TenantPersona, tmp_path: Path, name: str) -> None:
    # `pattern write devices/%u/telemetry` must match one topic: no wildcard or level separator.
    with pytest.raises(ValidationError):
        Device(device_type=make_device_type(), name="x", logical_identifier=name).full_clean()
    out = tmp_path / "pki"
    pki.init_ca(out)
    with pytest.raises(pki.PkiError):
        pki.issue_device(out, name, days=1)


# --------------------------------------------------------------------------- item 5: the ledger


def test_it_refuses_a_renamed_devices_certificate_after_another_tenant_takes_its_id(
    mtls: MtlsPlatform, beta: TenantPersona
) -> None:
    old_id = mtls.dev_a
    old_certificate = mtls.certificate(old_id)
    with schema_context(mtls.schema):
        device = Device.objects.get(logical_identifier=old_id)
        device.logical_identifier = unique_id("RENAMED")
        device.full_clean()
        device.save()
    # The freed id is registered in another tenant.
    with schema_context(beta.schema):
        beta_type = make_device_type()
        make_device(beta_type, logical_identifier=old_id)
    # What the operator (or the worker) runs after a change: rebuild the CRL, reload the broker.
    pki_command(mtls.out, "crl")
    mtls.reload_broker()

    log_before = len(mtls.broker.log_path.read_text(errors="replace"))
    attempt = _client(mtls.out / pki.CA_CERT, *old_certificate, old_id)
    try:
        attempt.client.connect("127.0.0.1", mtls.tls_port, keepalive=30)
        attempt.client.loop_start()
        # Were it let in, this would be stored in beta, the id's new owner.
        attempt.client.publish(f"devices/{old_id}/telemetry", b'{"msg_id": "ghost", "values": {"temperature": 66}}', 1)
        assert attempt.closed.wait(TIMEOUT), "the broker accepted the old certificate"
        assert not attempt.connected.is_set(), "the broker accepted the old certificate"
    except (ssl.SSLError, OSError):
        pass  # TLS 1.2: refused inside the handshake
    finally:
        attempt.client.loop_stop()
    assert "certificate verify failed" in mtls.broker.log_path.read_text(errors="replace")[log_before:]
    time.sleep(0.5)
    with schema_context(beta.schema):
        assert not TelemetryRaw.objects.filter(logical_identifier=old_id).exists()
    # The other device of alpha is unaffected.
    other = mtls.connect(mtls.dev_b)
    try:
        assert publish(other, mtls.dev_b, {"msg_id": "still-fine", "values": {"temperature": 3}}) == 0
    finally:
        other.close()
    wait_for(lambda: raw_msg_ids(mtls.schema, mtls.dev_b) == ["still-fine"], what="B's message")


def _ca(tmp_path: Path) -> Path:
    out = tmp_path / "pki"
    pki.init_ca(out)
    return out


def _crl_serials(out: Path) -> set[str]:
    return {format(entry.serial_number, "x") for entry in pki.load_crl(out / pki.CRL_FILE)}


def test_it_keeps_a_revoked_serial_in_the_crl_after_its_device_is_deleted(
    in_alpha: TenantPersona, tmp_path: Path
) -> None:
    from devices.services import certificate_crl_publish, certificate_issue, certificate_revoke

    out = _ca(tmp_path)
    device = make_device(make_device_type())
    serial = certificate_issue(device=device, out_dir=out, days=30).serial_number
    certificate_revoke(device=device, reason="stolen")
    device.delete()
    certificate_crl_publish(out_dir=out)
    assert serial in _crl_serials(out)


def test_it_revokes_the_certificates_of_a_deleted_or_renamed_device(in_alpha: TenantPersona, tmp_path: Path) -> None:
    from argus.models import CertificateLedgerEntry
    from devices.services import certificate_crl_publish, certificate_issue

    out = _ca(tmp_path)
    device_type = make_device_type()
    deleted, renamed, kept = (make_device(device_type) for _ in range(3))
    serial_deleted, serial_renamed, serial_kept = (
        certificate_issue(device=d, out_dir=out, days=30).serial_number for d in (deleted, renamed, kept)
    )
    deleted.delete()
    renamed = Device.objects.get(pk=renamed.pk)  # as the admin loads it
    renamed.logical_identifier = unique_id("NEW")
    renamed.save()
    certificate_crl_publish(out_dir=out)
    assert _crl_serials(out) == {serial_deleted, serial_renamed}
    ledger = dict(CertificateLedgerEntry.objects.values_list("serial_number", "revocation_reason"))
    assert (ledger[serial_deleted], ledger[serial_renamed], ledger[serial_kept]) == (
        "device deleted",
        "device renamed",
        "",
    )


def test_it_revokes_certificates_whose_device_went_by_a_path_that_skips_the_model(
    in_alpha: TenantPersona, tmp_path: Path
) -> None:
    from argus.models import CertificateLedgerEntry, CertificateStatus
    from devices.services import certificate_issue, certificate_ledger_reconcile

    out = _ca(tmp_path)
    device_type = make_device_type()
    bulk, kept = make_device(device_type), make_device(device_type)
    gone = certificate_issue(device=bulk, out_dir=out, days=30).serial_number
    alive = certificate_issue(device=kept, out_dir=out, days=30).serial_number
    Device.objects.filter(pk=bulk.pk).delete()  # the admin's "delete selected": no Device.delete()
    assert certificate_ledger_reconcile() == 1
    status = dict(CertificateLedgerEntry.objects.values_list("serial_number", "status"))
    assert (status[gone], status[alive]) == (CertificateStatus.REVOKED, CertificateStatus.ACTIVE)


# --------------------------------------------------------------------------- item 6: CRL renewal


def test_it_renews_an_expired_crl_from_the_beat_task_and_reloads_the_broker(
    mtls: MtlsPlatform, settings: SettingsWrapper, tmp_path: Path
) -> None:
    from devices.tasks import crl_renew

    assert settings.CELERY_BEAT_SCHEDULE["crl-renew"]["task"] == "devices.tasks.crl_renew"
    assert settings.CELERY_BEAT_SCHEDULE["crl-renew"]["schedule"] <= 3600
    # A CRL that ran out yesterday: OpenSSL now refuses every client certificate.
    pki.build_crl(mtls.out, [], days=7, last_update=datetime.now(UTC) - timedelta(days=8))
    mtls.reload_broker()
    mtls.refused(mtls.dev_a)

    settings.ARGUS_PKI_DIR = mtls.out
    settings.ARGUS_BROKER_PID_FILE = str(_write_pid_file(mtls, tmp_path / "mosquitto.pid"))
    settings.ARGUS_READINESS_CHECKS = CRL_AND_DATABASE
    web = Client(HTTP_HOST="probe.invalid")
    response = web.get("/readyz")
    assert response.status_code == 503
    assert {c["name"]: c["status"] for c in response.json()["checks"]} == {"database": "ok", "crl": "fail"}

    reloads = _reloads(mtls)
    crl_renew.apply().get()  # the task body as the worker runs it
    wait_for(lambda: _reloads(mtls) > reloads, timeout=TIMEOUT, what="the hook's SIGHUP to reach the broker")
    next_update = pki.load_crl(mtls.out / pki.CRL_FILE).next_update_utc
    assert next_update is not None and next_update > datetime.now(UTC) + timedelta(days=6)

    device = mtls.connect(mtls.dev_a)
    try:
        assert publish(device, mtls.dev_a, {"msg_id": "after-renewal", "values": {"temperature": 4}}) == 0
    finally:
        device.close()
    wait_for(lambda: raw_msg_ids(mtls.schema, mtls.dev_a) == ["after-renewal"], what="the message")
    assert web.get("/readyz").status_code == 200


def test_it_leaves_a_current_crl_alone_until_it_nears_expiry(live_db: None, tmp_path: Path) -> None:
    from devices.services import certificate_crl_renew

    out = _ca(tmp_path)
    first = certificate_crl_renew(out_dir=out)
    assert first is not None and first.rebuilt and first.reason == "missing" and not first.reloaded
    again = certificate_crl_renew(out_dir=out)
    assert again is not None and not again.rebuilt
    # Inside the renewal window (less than 6 of its 7 days left): rebuilt.
    pki.build_crl(out, [], days=7, last_update=datetime.now(UTC) - timedelta(days=1, hours=1))
    renewed = certificate_crl_renew(out_dir=out)
    assert renewed is not None and renewed.rebuilt and renewed.reason == "expiring"


def test_it_runs_the_broker_reload_command(tmp_path: Path) -> None:
    marker = tmp_path / "reloaded"
    assert pki.reload_broker(command=f"touch {marker}")
    assert marker.exists()
    assert not pki.reload_broker()
    with pytest.raises(pki.PkiError, match="exited"):
        pki.reload_broker(command="false")
    with pytest.raises(pki.PkiError, match="pid file"):
        pki.reload_broker(pid_file=tmp_path / "missing.pid")


# The checks these tests are about; the others (Redis, JetStream, lag) have tests/test_probes.py.
CRL_AND_DATABASE = ["argus.health.database_check", "devices.health.crl_check"]


def test_readyz_answers_on_any_host_and_fails_on_a_crl_that_runs_out_within_a_day(
    db: None, settings: SettingsWrapper, tmp_path: Path
) -> None:
    out = _ca(tmp_path)
    settings.ARGUS_PKI_DIR = out
    settings.ARGUS_READINESS_CHECKS = CRL_AND_DATABASE
    web = Client(HTTP_HOST="no-such-tenant.invalid")
    body = web.get("/readyz").json()
    assert body == {
        "status": "ok",
        "checks": [
            {"name": "database", "status": "ok", "detail": ""},
            {"name": "crl", "status": "skipped", "detail": "no CRL configured"},
        ],
    }
    pki.build_crl(out, [], days=7, last_update=datetime.now(UTC) - timedelta(days=6, hours=12))
    response = web.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "fail"
    crl = next(c for c in response.json()["checks"] if c["name"] == "crl")
    assert crl["status"] == "fail" and re.search(r"\(1[12]\.\d h left\)", crl["detail"])
    pki.build_crl(out, [], days=7)
    assert web.get("/readyz").status_code == 200
    assert Client(HTTP_HOST="alpha.test").get("/readyz").status_code == 200


def test_it_lists_checks_from_settings_so_a_new_one_is_one_line(db: None, settings: SettingsWrapper) -> None:
    settings.ARGUS_READINESS_CHECKS = [*CRL_AND_DATABASE, "tests.attacks.test_identity.failing_check"]
    response = Client(HTTP_HOST="x.invalid").get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"][-1] == {"name": "always", "status": "fail", "detail": "for the test"}


def failing_check() -> Any:
    from argus.health import CheckResult

    return CheckResult("always", False, "for the test")
