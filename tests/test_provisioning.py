"""Bulk provisioning (assets/provisioning.py, `manage.py provision`): every row validated first,
the valid ones written in one transaction, a report per row; ids of another tenant refused."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_tenants.utils import schema_context
from pytest_django.fixtures import SettingsWrapper

from argus.models import DeviceAPIKey, DeviceRegistration
from assets.models import Asset, AssetDevice, AssetType
from assets.provisioning import ProvisionFileError, devices_provision, read_rows
from devices import pki
from devices.models import Device, DeviceRole, DeviceType, ProcessingMode
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client, unique_id


def csv_bytes(header: str, *lines: str) -> bytes:
    return ("\n".join([header, *lines]) + "\n").encode()


@pytest.fixture
def types(in_alpha: TenantPersona) -> tuple[DeviceType, DeviceType]:
    """An endpoint type and a gateway type of tenant alpha."""
    return make_device_type(), make_device_type(processing_mode=ProcessingMode.GATEWAY)


def test_it_creates_gateways_children_metadata_and_asset_links_from_csv(types: tuple[DeviceType, DeviceType]) -> None:
    endpoint, gateway = types
    asset = Asset.objects.create(asset_type=AssetType.objects.create(name=unique_id("room")), name=unique_id("Room"))
    gw, child, solo = unique_id("GW"), unique_id("CH"), unique_id("EP")
    rows = read_rows(
        csv_bytes(
            "logical_identifier,name,device_type,parent,metadata,assets",
            # The child comes before its gateway: rows may be in any order.
            f'{child},Beacon 1,{endpoint.name},{gw},"{{""slot"": 3}}",',
            f"{gw},Hub,{gateway.name},,,",
            f"{solo},,{endpoint.name},,,{asset.name}",
        ),
        fmt="csv",
    )
    report = devices_provision(rows=rows)
    assert report.written and [o.action for o in report.outcomes] == ["created"] * 3
    devices = {d.logical_identifier: d for d in Device.objects.filter(logical_identifier__in=[gw, child, solo])}
    assert devices[child].parent_device == devices[gw] and devices[child].device_role == DeviceRole.CHILD
    assert devices[child].metadata == {"slot": 3}
    assert devices[gw].device_role == DeviceRole.GATEWAY
    assert devices[solo].name == solo and devices[solo].device_role == DeviceRole.STANDALONE
    assert AssetDevice.objects.filter(asset=asset, device=devices[solo]).exists()
    registered = DeviceRegistration.objects.filter(logical_identifier__in=[gw, child, solo])
    assert {(r.logical_identifier, r.device_id) for r in registered} == {(i, d.pk) for i, d in devices.items()}


def test_it_reports_unchanged_and_updated_rows_on_a_second_run(types: tuple[DeviceType, DeviceType]) -> None:
    endpoint, _ = types
    first, second = unique_id("EP"), unique_id("EP")
    rows = [
        {"logical_identifier": first, "name": "one", "device_type": endpoint.name},
        {"logical_identifier": second, "name": "two", "device_type": endpoint.name},
    ]
    devices_provision(rows=rows)
    rows[1]["name"] = "two, renamed"
    report = devices_provision(rows=rows)
    assert [o.action for o in report.outcomes] == ["unchanged", "updated"]
    assert Device.objects.get(logical_identifier=second).name == "two, renamed"


def test_it_refuses_each_bad_row_with_its_reason_and_writes_the_rest(
    types: tuple[DeviceType, DeviceType], beta: TenantPersona
) -> None:
    endpoint, gateway = types
    with schema_context(beta.schema):
        theirs = make_device(make_device_type()).logical_identifier
    bad_gateway, ok = unique_id("GW"), unique_id("EP")
    cycle_a, cycle_b = unique_id("CY"), unique_id("CY")
    rows: list[dict[str, Any]] = [
        {"logical_identifier": ok, "device_type": endpoint.name},
        {"logical_identifier": unique_id("EP"), "device_type": "no such type"},
        {"logical_identifier": "has/slash", "device_type": endpoint.name},
        {"logical_identifier": ok, "device_type": endpoint.name},
        {"logical_identifier": theirs, "device_type": endpoint.name},
        {"logical_identifier": unique_id("EP"), "device_type": endpoint.name, "parent": "NOWHERE"},
        {"logical_identifier": bad_gateway, "device_type": gateway.name, "metadata": {"x": "y" * 20_000}},
        {"logical_identifier": unique_id("CH"), "device_type": endpoint.name, "parent": bad_gateway},
        {"logical_identifier": cycle_a, "device_type": gateway.name, "parent": cycle_b},
        {"logical_identifier": cycle_b, "device_type": gateway.name, "parent": cycle_a},
        {"logical_identifier": unique_id("EP"), "device_type": endpoint.name, "assets": ["No such asset"]},
        {"device_type": endpoint.name},
    ]
    report = devices_provision(rows=rows)
    assert report.written
    outcomes = report.outcomes
    assert [o.action for o in outcomes] == ["created"] + ["refused"] * 11
    reasons = [" ".join(m for ms in o.errors.values() for m in ms) for o in outcomes[1:]]
    assert "No device type named 'no such type'" in reasons[0]
    assert "Letters, digits" in reasons[1]
    assert "more than once" in reasons[2]
    # Another tenant's id: refused as taken, without naming the tenant.
    assert reasons[3] == "This logical identifier is already used on this platform."
    assert "No device 'NOWHERE'" in reasons[4]
    assert "bytes of JSON" in reasons[5]
    assert "gateway" in reasons[6] and "refused" in reasons[6]
    assert "cycle" in reasons[7] and "cycle" in reasons[8]
    assert "No asset named" in reasons[9]
    assert list(outcomes[11].errors) == ["logical_identifier"]
    assert Device.objects.filter(logical_identifier=ok).exists()
    assert not Device.objects.filter(logical_identifier__in=[bad_gateway, cycle_a, cycle_b]).exists()
    with schema_context(beta.schema):
        assert Device.objects.filter(logical_identifier=theirs).exists()


def test_it_writes_nothing_all_or_nothing_or_on_a_dry_run(types: tuple[DeviceType, DeviceType]) -> None:
    endpoint, _ = types
    good = unique_id("EP")
    rows = [{"logical_identifier": good, "device_type": endpoint.name}, {"logical_identifier": "", "device_type": ""}]
    report = devices_provision(rows=rows, all_or_nothing=True)
    assert not report.written and [o.action for o in report.outcomes] == ["created", "refused"]
    assert devices_provision(rows=rows[:1], dry_run=True).written is False
    assert not Device.objects.filter(logical_identifier=good).exists()


def test_it_provisions_many_rows_in_a_fixed_number_of_queries(types: tuple[DeviceType, DeviceType]) -> None:
    endpoint, gateway = types
    gateways = [unique_id("GW") for _ in range(20)]
    rows = [{"logical_identifier": g, "device_type": gateway.name} for g in gateways]
    rows += [
        {"logical_identifier": unique_id("CH"), "device_type": endpoint.name, "parent": gateways[i % 20]}
        for i in range(480)
    ]
    with CaptureQueriesContext(connection) as queries:
        report = devices_provision(rows=rows)
    assert report.count("created") == 500
    assert len(queries) <= 20, [q["sql"][:80] for q in queries.captured_queries]


@pytest.mark.parametrize(
    "data,fmt,message",
    [
        (b"logical_identifier,colour\nA,red\n", "csv", "Unknown columns: colour"),
        (b"logical_identifier,device_type\nA,t,extra\n", "csv", "more cells"),
        (b"logical_identifier\n\xff\n", "csv", "UTF-8"),
        (b'{"logical_identifier": "A"}', "json", "list of objects"),
        (b"[1, 2]", "json", "list of objects"),
        (b"[", "json", "Not JSON"),
        (b"", "xml", "csv or json"),
    ],
)
def test_it_refuses_a_file_it_cannot_read_as_a_whole(data: bytes, fmt: str, message: str) -> None:
    with pytest.raises(ProvisionFileError, match=message):
        read_rows(data, fmt=fmt)


def test_it_bounds_a_files_rows(settings: SettingsWrapper) -> None:
    settings.ARGUS_PROVISION_MAX_ROWS = 2
    with pytest.raises(ProvisionFileError, match="At most 2 rows"):
        read_rows(orjson.dumps([{}, {}, {}]), fmt="json")


# --------------------------------------------------------------------------- the command


def test_the_command_issues_certificate_bundles_and_api_keys(
    db: None, alpha: TenantPersona, pki_dir: Path, tmp_path: Path
) -> None:
    with schema_context(alpha.schema):
        endpoint = make_device_type()
    first, second = unique_id("EP"), unique_id("EP")
    source = tmp_path / "fleet.json"
    source.write_bytes(orjson.dumps([{"logical_identifier": i, "device_type": endpoint.name} for i in (first, second)]))
    out = io.StringIO()
    bundles = tmp_path / "bundles"
    call_command(
        "provision", str(source), schema=alpha.schema, issue_certificates=str(bundles), api_keys=True, stdout=out
    )
    text = out.getvalue()
    assert f"row 1  {first}  created" in text and "2 rows: 2 created" in text
    ca = x509.load_pem_x509_certificate((pki_dir / pki.CA_CERT).read_bytes())
    for logical_id in (first, second):
        cert = x509.load_pem_x509_certificate((bundles / logical_id / "device.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == logical_id
        cert.verify_directly_issued_by(ca)
        assert (bundles / logical_id / "device.key").stat().st_mode & 0o077 == 0
        assert (bundles / logical_id / "ca.crt").exists()
        # The device's key is in its bundle only, not kept beside the CA.
        assert not list((pki_dir / pki.DEVICES_DIR / logical_id).glob("*.key"))
        line = next(line for line in text.splitlines() if line.startswith(logical_id + "\t"))
        key = line.split("\t")[1]
        api_key = DeviceAPIKey.objects.get_from_key(key)
        assert isinstance(api_key, DeviceAPIKey) and api_key.logical_identifier == logical_id
    with schema_context(alpha.schema):
        assert Device.objects.get(logical_identifier=first).certificates.count() == 1


def test_the_command_reports_refusals_and_exits_non_zero(db: None, alpha: TenantPersona, tmp_path: Path) -> None:
    with schema_context(alpha.schema):
        endpoint = make_device_type()
    good = unique_id("EP")
    source = tmp_path / "fleet.csv"
    source.write_bytes(csv_bytes("logical_identifier,device_type", f"{good},{endpoint.name}", "bad id,nope"))
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 row"):
        call_command("provision", str(source), schema=alpha.schema, all_or_nothing=True, stdout=out)
    assert "row 2  bad id  refused  " in out.getvalue() and "logical_identifier: Letters" in out.getvalue()
    assert "nothing written" in out.getvalue()
    with schema_context(alpha.schema):
        assert not Device.objects.filter(logical_identifier=good).exists()
    with pytest.raises(CommandError, match="no tenant"):
        call_command("provision", str(source), schema="no_such_tenant")


# --------------------------------------------------------------------------- the admin's import


def test_the_admin_import_shows_the_dry_run_then_writes_on_confirmation(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        endpoint = make_device_type()
    client = tenant_admin_client(alpha)
    first, second = unique_id("EP"), unique_id("EP")
    upload = SimpleUploadedFile(
        "fleet.csv",
        csv_bytes(
            "logical_identifier,name,device_type", f"{first},<b>one</b>,{endpoint.name}", f"{second},,{endpoint.name}"
        ),
    )
    page = client.post("/admin/devices/device/import/", {"format": "0", "import_file": upload, "resource": "0"})
    assert page.status_code == 200
    html = page.content.decode()
    assert first in html and "&lt;b&gt;one&lt;/b&gt;" in html and "<b>one</b>" not in html
    with schema_context(alpha.schema):
        assert not Device.objects.filter(logical_identifier__in=[first, second]).exists()  # a dry run
    confirm = page.context["confirm_form"]
    done = client.post("/admin/devices/device/process_import/", {**confirm.initial, "resource": "0"})
    assert done.status_code == 302, done.content[:500]
    with schema_context(alpha.schema):
        assert Device.objects.get(logical_identifier=first).name == "<b>one</b>"
        assert Device.objects.filter(logical_identifier=second).exists()


def test_the_admin_import_shows_refusals_and_offers_no_confirmation(db: None, alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        endpoint = make_device_type()
    client = tenant_admin_client(alpha)
    good = unique_id("EP")
    upload = SimpleUploadedFile(
        "fleet.csv", csv_bytes("logical_identifier,device_type", f"{good},{endpoint.name}", f"{unique_id('EP')},nope")
    )
    page = client.post("/admin/devices/device/import/", {"format": "0", "import_file": upload, "resource": "0"})
    assert page.status_code == 200
    assert "No device type named" in page.content.decode()
    assert "confirm_form" not in page.context
    with schema_context(alpha.schema):
        assert not Device.objects.filter(logical_identifier=good).exists()
