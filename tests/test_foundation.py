"""Tenancy, the public registry, admin validation of profile JSON, append-only raw, the seed."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django_tenants.utils import schema_context

from argus.models import DeviceRegistration, Organization
from argus.registry import registry_lookup
from assets.models import Alert, Asset, AssetType, ThresholdRule
from assets.seeding import seed_iot
from devices.models import Device, DeviceType
from telemetry.models import RawStatus, TelemetryRaw
from tests.conftest import TenantPersona, make_device, make_device_type, tenant_admin_client, unique_id

pytestmark = pytest.mark.django_db


# --- Tenancy and the registry ------------------------------------------------------------------


def test_it_keeps_each_tenants_devices_in_its_own_schema(alpha: TenantPersona, beta: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
    with schema_context(beta.schema):
        assert not Device.objects.filter(logical_identifier=device.logical_identifier).exists()
        assert not DeviceType.objects.filter(pk=device.device_type_id, name=device.device_type.name).exists()
    with schema_context(alpha.schema):
        assert Device.objects.filter(logical_identifier=device.logical_identifier).exists()


def test_it_registers_devices_platform_wide(alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        device = make_device(make_device_type())
        assert registry_lookup(device.logical_identifier) == "alpha"
        old_id = device.logical_identifier
        device.logical_identifier = unique_id("RENAMED")
        device.save()
        assert registry_lookup(old_id) is None
        assert registry_lookup(device.logical_identifier) == "alpha"
        new_id = device.logical_identifier
        device.delete()
    assert registry_lookup(new_id) is None


def test_it_refuses_a_logical_identifier_another_tenant_uses(alpha: TenantPersona, beta: TenantPersona) -> None:
    with schema_context(alpha.schema):
        taken = make_device(make_device_type()).logical_identifier
    with schema_context(beta.schema):
        device_type = make_device_type()
        duplicate = Device(device_type=device_type, name="impostor", logical_identifier=taken)
        with pytest.raises(ValidationError) as excinfo:
            duplicate.full_clean()
        assert "logical_identifier" in excinfo.value.message_dict
        with pytest.raises(IntegrityError), transaction.atomic():
            duplicate.save()
    assert DeviceRegistration.objects.get(logical_identifier=taken).tenant.schema_name == "alpha"


def test_it_enforces_device_constraints_in_the_database(in_alpha: TenantPersona) -> None:
    device_type = make_device_type()
    with pytest.raises(IntegrityError), transaction.atomic():
        Device.objects.create(
            device_type=device_type, name="orphan", logical_identifier=unique_id("C"), device_role="child"
        )


def test_it_shows_a_tenant_admin_only_its_own_devices(alpha: TenantPersona, beta: TenantPersona) -> None:
    with schema_context(alpha.schema):
        mine = make_device(make_device_type())
    with schema_context(beta.schema):
        theirs = make_device(make_device_type())
    client = tenant_admin_client(alpha)
    listing = client.get("/admin/devices/device/")
    assert listing.status_code == 200
    assert mine.logical_identifier in listing.content.decode()
    assert theirs.logical_identifier not in listing.content.decode()
    # Beta's device id means nothing on alpha's site: at most alpha's own device with that id.
    change = client.get(f"/admin/devices/device/{theirs.pk}/change/", follow=True)
    assert theirs.logical_identifier not in change.content.decode()


def test_it_does_not_let_one_tenants_admin_into_another_tenants_site(alpha: TenantPersona, beta: TenantPersona) -> None:
    client = tenant_admin_client(alpha)
    client.defaults["HTTP_HOST"] = beta.host
    response = client.get("/admin/devices/device/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_it_hides_tenant_tables_from_the_platform_site() -> None:
    user = get_user_model()._default_manager.create_superuser(
        username="platform", email="p@example.com", password="pw-for-tests"
    )
    client = Client(HTTP_HOST="platform.unknown")
    client.force_login(user)
    index = client.get("/admin/").content.decode()
    assert "/admin/argus/organization/" in index
    assert "/admin/devices/" not in index
    assert client.get("/admin/devices/device/").status_code == 403


# --- Admin validation of the JSON profile fields ---------------------------------------------------


def device_type_form(**overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": unique_id("Sensor"),
        "description": "",
        "processing_mode": "endpoint",
        "protocol_adapter": "argus_json",
        "message_schema": json.dumps({"type": "object", "required": ["values"]}),
        "metrics": json.dumps(["temperature"]),
        "child_device_type": "",
        "max_children": "5000",
        "chunk_ttl_seconds": "60",
        "max_chunks": "100",
    }
    form.update(overrides)
    return form


def errors_of(response: Any) -> dict[str, list[str]]:
    assert response.status_code == 200, "the form was expected to be shown again with errors"
    form = response.context["adminform"].form
    return {field: [str(e) for e in errs] for field, errs in form.errors.items()}


def test_it_saves_a_device_type_with_a_valid_message_schema(alpha: TenantPersona) -> None:
    client = tenant_admin_client(alpha)
    form = device_type_form()
    response = client.post("/admin/devices/devicetype/add/", form)
    assert response.status_code == 302, errors_of(response)
    with schema_context(alpha.schema):
        assert DeviceType.objects.get(name=form["name"]).message_schema == {"type": "object", "required": ["values"]}


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("message_schema", json.dumps({"type": "no-such-type"}), "Not a valid JSON Schema"),
        ("message_schema", json.dumps({"properties": {"values": {"minimum": "ten"}}}), "Not a valid JSON Schema"),
        ("message_schema", json.dumps(["not", "an", "object"]), "Must be a JSON object"),
        ("message_schema", "{not json", "Enter a valid JSON"),
        ("metrics", json.dumps(["temperature", "temperature"]), "more than once"),
        ("metrics", json.dumps(["has space"]), "is not a metric key"),
        ("metrics", json.dumps({"temperature": 1}), "Must be a JSON list"),
    ],
)
def test_it_shows_device_type_json_errors_next_to_the_field(
    alpha: TenantPersona, field: str, value: str, expected: str
) -> None:
    client = tenant_admin_client(alpha)
    response = client.post("/admin/devices/devicetype/add/", device_type_form(**{field: value}))
    errors = errors_of(response)
    assert any(expected in message for message in errors.get(field, [])), errors
    assert 'class="errorlist' in response.content.decode()


def asset_type_form(**overrides: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": unique_id("Pump"),
        "category": "equipment",
        "description": "",
        "metric_definitions": json.dumps(
            [{"key": "temperature", "unit": "°C", "min": 10, "max": 30}, {"key": "humidity", "min": 0, "max": 80}]
        ),
        "transformation_engine": "none",
        "transformation_config": "{}",
        "health_algorithm": "weighted",
        "health_parameters": json.dumps({"weights": {"temperature": 2, "humidity": 1}}),
    }
    form.update(overrides)
    return form


def test_it_saves_an_asset_type_with_valid_metrics_and_health_parameters(alpha: TenantPersona) -> None:
    with schema_context(alpha.schema):
        make_device_type(metrics=["temperature", "humidity"])
    client = tenant_admin_client(alpha)
    form = asset_type_form()
    response = client.post("/admin/assets/assettype/add/", form)
    assert response.status_code == 302, errors_of(response)
    with schema_context(alpha.schema):
        assert AssetType.objects.get(name=form["name"]).health_parameters["weights"]["temperature"] == 2


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"metric_definitions": json.dumps([{"key": "vibration"}])}, "metric_definitions", "No device type reports"),
        ({"metric_definitions": json.dumps([{"unit": "C"}])}, "metric_definitions", "'key' is a required property"),
        (
            {"metric_definitions": json.dumps([{"key": "temperature", "min": 5, "max": 1}])},
            "metric_definitions",
            "min is above max",
        ),
        ({"health_parameters": json.dumps({})}, "health_parameters", "'weights' is a required property"),
        (
            {"health_parameters": json.dumps({"weights": {"pressure": 1}})},
            "health_parameters",
            "Not in the metric definitions: pressure",
        ),
        (
            {"health_algorithm": "threshold", "health_parameters": json.dumps({"penalties": {"critical": 150}})},
            "health_parameters",
            "150 is greater than the maximum of 100",
        ),
        (
            {
                "health_parameters": json.dumps(
                    {
                        "weights": {"temperature": 1},
                        "ranges": {"temperature": {"normal": [10, 20], "critical": [15, 30]}},
                    }
                )
            },
            "health_parameters",
            "temperature: the critical range must contain the normal range.",
        ),
        (
            {"transformation_engine": "linear", "transformation_config": json.dumps({"pressure": {"scale": 0.1}})},
            "transformation_config",
            "Not in the metric definitions: pressure",
        ),
        (
            {"transformation_engine": "linear", "transformation_config": json.dumps({"temperature": {"scale": "x"}})},
            "transformation_config",
            "is not of type 'number'",
        ),
    ],
)
def test_it_shows_asset_type_json_errors_next_to_the_field(
    alpha: TenantPersona, overrides: dict[str, Any], field: str, expected: str
) -> None:
    with schema_context(alpha.schema):
        make_device_type(metrics=["temperature", "humidity"])
    client = tenant_admin_client(alpha)
    response = client.post("/admin/assets/assettype/add/", asset_type_form(**overrides))
    errors = errors_of(response)
    assert any(expected in message for message in errors.get(field, [])), errors


def test_it_refuses_a_threshold_rule_on_a_metric_the_asset_type_lacks(in_alpha: TenantPersona) -> None:
    make_device_type(metrics=["temperature"])
    asset_type = AssetType.objects.create(
        name=unique_id("AT"), metric_definitions=[{"key": "temperature"}], health_algorithm="none"
    )
    rule = ThresholdRule(name="r", asset_type=asset_type, metric="pressure", operator="gt", threshold=1)
    with pytest.raises(ValidationError) as excinfo:
        rule.full_clean()
    assert "metric" in excinfo.value.message_dict
    ranged = ThresholdRule(name="r", asset_type=asset_type, metric="temperature", operator="outside", threshold=5)
    with pytest.raises(ValidationError) as excinfo:
        ranged.full_clean()
    assert "threshold_high" in excinfo.value.message_dict


def test_it_allows_one_open_alert_per_rule_and_asset(in_alpha: TenantPersona) -> None:
    make_device_type(metrics=["temperature"])
    asset_type = AssetType.objects.create(name=unique_id("AT"), metric_definitions=[{"key": "temperature"}])
    asset = Asset.objects.create(name=unique_id("asset"), asset_type=asset_type)
    rule = ThresholdRule.objects.create(
        name="hot", asset_type=asset_type, metric="temperature", operator="gt", threshold=30
    )
    now = datetime.now(UTC)
    Alert.objects.create(rule=rule, asset=asset, metric="temperature", value=31, severity="warning", raised_at=now)
    with pytest.raises(IntegrityError), transaction.atomic():
        Alert.objects.create(rule=rule, asset=asset, metric="temperature", value=32, severity="warning", raised_at=now)


# --- Storage -----------------------------------------------------------------------------------


def raw_row(device: Device) -> TelemetryRaw:
    return TelemetryRaw.objects.create(
        device=device,
        logical_identifier=device.logical_identifier,
        ingest_key=unique_id("key"),
        payload=b'{"values": {"temperature": 1}}',
        received_at=datetime.now(UTC),
        status=RawStatus.ACCEPTED,
    )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE telemetry_raw SET reason = 'tampered' WHERE id = %s",
        "DELETE FROM telemetry_raw WHERE id = %s",
        "TRUNCATE telemetry_raw CASCADE",
    ],
)
def test_it_refuses_to_change_raw_telemetry(in_alpha: TenantPersona, statement: str) -> None:
    row = raw_row(make_device(make_device_type()))
    with connection.cursor() as cursor:
        # Django's foreign keys are deferred; TRUNCATE refuses to run while checks are pending.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    with pytest.raises(Exception, match="append-only") as excinfo, transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(statement, [row.pk] if "%s" in statement else [])
    assert type(excinfo.value.__cause__).__name__ == "InsufficientPrivilege"
    assert TelemetryRaw.objects.get(pk=row.pk).reason == ""


def test_it_refuses_to_change_raw_telemetry_through_the_orm(in_alpha: TenantPersona) -> None:
    row = raw_row(make_device(make_device_type()))
    with pytest.raises(Exception, match="append-only"), transaction.atomic():
        TelemetryRaw.objects.filter(pk=row.pk).update(reason="tampered")
    with pytest.raises(Exception, match="append-only"), transaction.atomic():
        row.delete()


def test_it_partitions_history_by_day(in_alpha: TenantPersona) -> None:
    today = datetime.now(UTC).strftime("%Y%m%d")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
            "WHERE p.relname = 'telemetry_history' AND n.nspname = %s",
            [in_alpha.schema],
        )
        partitions = {row[0] for row in cursor.fetchall()}
        assert f"telemetry_history_p{today}" in partitions
        assert "telemetry_history_default" in partitions
        cursor.execute(
            "INSERT INTO telemetry_history (time, device_id, metric, value, raw_id) VALUES "
            "(now(), 1, 'temperature', 20.5, 1), ('2001-01-01T00:00:00Z', 1, 'temperature', 3, 1)"
        )
        cursor.execute("SELECT tableoid::regclass::text FROM telemetry_history WHERE device_id = 1 ORDER BY time")
        where = [row[0] for row in cursor.fetchall()]
    assert where[0].endswith("telemetry_history_default")
    assert where[1].endswith(f"telemetry_history_p{today}")


# --- Seed ---------------------------------------------------------------------------------------


def counts(schema: str) -> dict[str, int]:
    with schema_context(schema):
        return {
            "device_types": DeviceType.objects.count(),
            "devices": Device.objects.count(),
            "asset_types": AssetType.objects.count(),
            "assets": Asset.objects.count(),
            "rules": ThresholdRule.objects.count(),
        }


def test_it_seeds_the_demo_tenant_once() -> None:
    first = seed_iot(admin_password="first-password")
    assert first.schema_name == "demo"
    assert counts("demo") == {"device_types": 3, "devices": 4, "asset_types": 2, "assets": 2, "rules": 5}
    with schema_context("demo"):
        assert set(Device.objects.values_list("logical_identifier", flat=True)) == {
            "TS-001-2024",
            "TS-002-2024",
            "LH-001-2024",
            "BG-001-2024",
        }
        assert set(Asset.objects.values_list("name", flat=True)) == {"HVAC Unit A1", "Cold Storage Room 1"}
        modes = dict(DeviceType.objects.values_list("name", "processing_mode"))
        assert modes == {
            "Temperature Sensor": "endpoint",
            "Location Hub": "gateway",
            "BLE Gateway": "gateway_chunked",
        }
        assert DeviceType.objects.get(name="Location Hub").auto_register_children
        assert DeviceType.objects.get(name="BLE Gateway").auto_register_children
    demo = Organization.objects.get(schema_name="demo")
    assert set(demo.domains.values_list("domain", flat=True)) == {"demo.localhost", "localhost"}
    assert registry_lookup("TS-001-2024") == "demo"

    second = seed_iot(admin_password="second-password")
    assert second.created == []
    assert second.admin_password is None
    assert counts("demo") == {"device_types": 3, "devices": 4, "asset_types": 2, "assets": 2, "rules": 5}


def test_it_prints_where_to_log_in(capsys: pytest.CaptureFixture[str]) -> None:
    call_command("seed_iot")
    call_command("seed_iot")
    out = capsys.readouterr().out
    assert "http://demo.localhost:8000/admin/" in out
    assert "Nothing to do" in out


def test_it_exports_prometheus_metrics_and_health() -> None:
    client = Client(HTTP_HOST="platform.unknown")
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "python_info" in response.content.decode()
