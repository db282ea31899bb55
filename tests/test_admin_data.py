"""The tenant admin shows the data (issue 15, item 8): a raw message's payload as indented JSON or
hex, a device's latest readings, JSON fields indented, a raw list that never counts or scans the
whole table, and key and certificate actions on the device list."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context

from argus.models import CertificateLedgerEntry, DeviceAPIKey
from devices.models import Device
from devices.services import api_key_create, certificate_issue
from telemetry.models import TelemetryHistory, TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client


def raw_row(device: Device, payload: bytes, *, msg_id: str, status: str = "accepted", reason: str = "") -> TelemetryRaw:
    return TelemetryRaw.objects.create(
        device=device,
        logical_identifier=device.logical_identifier,
        msg_id=msg_id,
        ingest_key=f"{device.logical_identifier}/m/{msg_id}",
        payload=payload,
        received_at=timezone.now(),
        status=status,
        reason=reason,
    )


def test_it_shows_a_json_payload_indented_and_escaped(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
        row = raw_row(device, b'{"msg_id":"m1","values":{"note":"<script>alert(1)</script>"}}', msg_id="m1")
    page = tenant_admin_client(alpha).get(f"/admin/telemetry/telemetryraw/{row.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "  &quot;values&quot;: {\n    &quot;note&quot;: &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;" in html
    assert "<script>alert(1)" not in html


def test_it_shows_a_binary_payload_as_a_hex_dump(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
        row = raw_row(device, bytes(range(0xF0, 0x100)) + b"<b>", msg_id="bin", status="rejected", reason="not UTF-8")
    html = tenant_admin_client(alpha).get(f"/admin/telemetry/telemetryraw/{row.pk}/change/").content.decode()
    assert "00000000  f0 f1 f2 f3 f4 f5 f6 f7 f8 f9 fa fb fc fd fe ff  ................" in html
    assert "00000010  3c 62 3e" in html and "&lt;b&gt;" in html


def test_the_raw_list_neither_counts_nor_scans_the_whole_table(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device_type = make_device_type()
        mine, other = make_device(device_type), make_device(device_type)
        raw_row(mine, b"{}", msg_id="a")
        raw_row(other, b"{}", msg_id="b")
    client = tenant_admin_client(alpha)
    with CaptureQueriesContext(connection) as queries:
        page = client.get("/admin/telemetry/telemetryraw/")
    assert page.status_code == 200
    raw_queries = [q["sql"] for q in queries.captured_queries if "telemetry_raw" in q["sql"]]
    counts = [sql for sql in raw_queries if "COUNT(" in sql.upper()]
    assert counts and all("LIMIT" in sql.upper() for sql in counts), counts
    assert not any("DISTINCT" in sql.upper() for sql in raw_queries)  # a date hierarchy's
    by_device = results(client.get("/admin/telemetry/telemetryraw/", {"q": mine.logical_identifier}))
    assert mine.logical_identifier in by_device and other.logical_identifier not in by_device
    one = results(client.get("/admin/telemetry/telemetryraw/", {"q": f"{other.logical_identifier}/m/b"}))
    assert other.logical_identifier in one and mine.logical_identifier not in one


def results(page: Any) -> str:
    """The change list's table, without the search box that repeats the query."""
    return str(page.content.decode().split('id="result_list"', 1)[1].split("</table>", 1)[0])


def test_it_edits_json_fields_indented(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device_type = make_device_type()
    html = tenant_admin_client(alpha).get(f"/admin/devices/devicetype/{device_type.pk}/change/").content.decode()
    assert "font-family: monospace" in html
    assert "{\n  &quot;type&quot;: &quot;object&quot;,\n  &quot;properties&quot;: {" in html


def test_the_device_page_shows_its_latest_readings(db: None, alpha: TenantPersona) -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    with schema_context(alpha.schema):
        device = make_device(make_device_type(), last_seen=now)
        TelemetryHistory.objects.bulk_create(
            [
                TelemetryHistory(
                    device_id=device.pk, metric="temperature", time=now - timedelta(minutes=1), value=1, raw_id=0
                ),
                TelemetryHistory(device_id=device.pk, metric="temperature", time=now, value=21.5, raw_id=0),
                TelemetryHistory(device_id=device.pk, metric="humidity", time=now, value=40, raw_id=0),
            ]
        )
    html = tenant_admin_client(alpha).get(f"/admin/devices/device/{device.pk}/change/").content.decode()
    assert "<td>temperature</td><td>21.5</td><td>2026-12-04T12:00:00+00:00</td>" in html
    assert "<td>humidity</td><td>40.0</td>" in html


def test_it_issues_api_keys_shown_once_and_revokes_them(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    client = tenant_admin_client(alpha)
    page = client.post(
        "/admin/devices/device/", {"action": "issue_api_keys", "_selected_action": [device.pk], "index": 0}
    )
    assert page.status_code == 200 and "no-store" in page["Cache-Control"]
    key = re.search(r"<td><code>([A-Za-z0-9]{8}\.[A-Za-z0-9]+)</code></td>", page.content.decode())
    assert key is not None
    api_key = DeviceAPIKey.objects.get_from_key(key.group(1))
    assert isinstance(api_key, DeviceAPIKey) and api_key.logical_identifier == device.logical_identifier
    client.post("/admin/devices/device/", {"action": "revoke_api_keys", "_selected_action": [device.pk], "index": 0})
    api_key.refresh_from_db()
    assert api_key.revoked


def test_it_revokes_a_devices_certificates(db: None, alpha: TenantPersona, pki_dir: Path) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
        certificate = certificate_issue(device=device, out_dir=pki_dir, days=30)
    client = tenant_admin_client(alpha)
    client.post(
        "/admin/devices/device/", {"action": "revoke_certificates", "_selected_action": [device.pk], "index": 0}
    )
    with schema_context(alpha.schema):
        certificate.refresh_from_db()
    assert certificate.revoked_at is not None and "revoked in the admin" in certificate.revocation_reason
    assert CertificateLedgerEntry.objects.get(serial_number=certificate.serial_number).revoked_at is not None


def test_a_tenant_admin_revokes_only_its_own_tenants_keys(db: None, alpha: TenantPersona, beta: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    theirs, _ = api_key_create(logical_id=device.logical_identifier)
    # A key of the same id held in another tenant's name (an id once theirs) is not this admin's.
    DeviceAPIKey.objects.filter(pk=theirs.pk).update(tenant=beta.tenant)
    client = tenant_admin_client(alpha)
    client.post("/admin/devices/device/", {"action": "revoke_api_keys", "_selected_action": [device.pk], "index": 0})
    theirs.refresh_from_db()
    assert not theirs.revoked
