"""The read API (docs/api.md): who may call it, tenant isolation of every endpoint, latest values
by device time, history against a direct SQL computation, cursors, bounds, writes and the
alert actions. Requests go through the whole stack (host -> tenant, token or session)."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tenants.utils import schema_context

from assets.models import Alert, AlertStatus, Asset, AssetDevice, AssetHealthScore, AssetType, ThresholdRule
from devices.models import Device, DeviceRole
from telemetry.models import TelemetryHistory
from tests.conftest import TenantPersona, make_device, make_device_type, unique_id

API = "/api/v1"


@dataclass
class ApiUser:
    """A user of one tenant with a token, calling on that tenant's host."""

    persona: TenantPersona
    username: str
    token: str

    def client(self, host: str | None = None) -> Client:
        return Client(HTTP_HOST=host or self.persona.host, HTTP_AUTHORIZATION=f"Token {self.token}")

    def get(self, path: str, **params: Any) -> Any:
        return self.client().get(API + path, params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.client().post(API + path, json.dumps(body or {}), content_type="application/json")

    def patch(self, path: str, body: Any) -> Any:
        return self.client().patch(API + path, json.dumps(body), content_type="application/json")


def api_user(persona: TenantPersona, *perms: str) -> ApiUser:
    """A user of the tenant holding these permissions (codenames), with a token made the way the
    docs say: `manage.py tenant_command drf_create_token <user> --schema=<tenant>`."""
    username = unique_id("user")
    with schema_context(persona.schema):
        user = get_user_model()._default_manager.create_user(username=username, password="pw-for-tests")
        user.user_permissions.set(Permission.objects.filter(codename__in=perms))
    out = io.StringIO()
    call_command("tenant_command", "drf_create_token", username, schema=persona.schema, stdout=out)
    token = out.getvalue().split()[2]
    return ApiUser(persona, username, token)


WRITER_PERMS = ("add_device", "change_device", "add_asset", "change_asset", "change_alert")


@pytest.fixture
def reader(db: None, alpha: TenantPersona) -> ApiUser:
    return api_user(alpha)


@pytest.fixture
def writer(db: None, alpha: TenantPersona) -> ApiUser:
    return api_user(alpha, *WRITER_PERMS)


@pytest.fixture
def outsider(db: None, beta: TenantPersona) -> ApiUser:
    """A user of tenant beta with every permission there."""
    return api_user(beta, *WRITER_PERMS)


def readings(device: Device, metric: str, points: list[tuple[datetime, float]]) -> None:
    TelemetryHistory.objects.bulk_create(
        TelemetryHistory(device_id=device.pk, metric=metric, time=t, value=v, raw_id=0) for t, v in points
    )


@dataclass
class Fleet:
    """In tenant alpha: a device with readings, an asset it feeds, a rule, an alert, a health history."""

    device: Device
    asset: Asset
    alert: Alert


def fleet(persona: TenantPersona) -> Fleet:
    now = timezone.now()
    with schema_context(persona.schema):
        device = make_device(make_device_type(metrics=["temperature", "humidity"]))
        readings(device, "temperature", [(now - timedelta(minutes=m), 20.0 + m) for m in range(5)])
        asset_type = AssetType.objects.create(
            name=unique_id("asset-type"),
            metric_definitions=[{"key": "temp_f", "min": 0, "max": 100}],
            transformation_engine="linear",
            transformation_config={"temp_f": {"scale": 1.8, "offset": 32}},
        )
        asset = Asset.objects.create(asset_type=asset_type, name=unique_id("asset"), health_score=Decimal("80"))
        AssetDevice.objects.create(asset=asset, device=device, metric_mapping={"temperature": "temp_f"})
        rule = ThresholdRule.objects.create(
            name=unique_id("rule"), asset_type=asset_type, metric="temp_f", operator="gt", threshold=60
        )
        alert = Alert.objects.create(
            rule=rule, asset=asset, device=device, metric="temp_f", value=68.0, severity="warning", raised_at=now
        )
        AssetHealthScore.objects.create(
            asset=asset, time=now - timedelta(minutes=1), score=80, algorithm="threshold", version=2, explanation={}
        )
    return Fleet(device, asset, alert)


# --------------------------------------------------------------------------- who may call it


def test_it_answers_401_without_a_credential(reader: ApiUser) -> None:
    response = Client(HTTP_HOST=reader.persona.host).get(f"{API}/devices/")
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    assert response["WWW-Authenticate"] == "Token"
    assert response.json()["type"] == "urn:argus:problem:not_authenticated"


def test_it_takes_a_token_made_by_drf_create_token(reader: ApiUser) -> None:
    response = reader.get("/devices/")
    assert response.status_code == 200, response.content
    assert set(response.json()) == {"next", "previous", "results"}


def test_it_takes_a_session_and_checks_csrf_on_writes(db: None, alpha: TenantPersona) -> None:
    user = api_user(alpha, *WRITER_PERMS)
    with schema_context(alpha.schema):
        account = get_user_model()._default_manager.get(username=user.username)
        client = Client(HTTP_HOST=alpha.host, enforce_csrf_checks=True)
        client.force_login(account)
    assert client.get(f"{API}/devices/").status_code == 200
    refused = client.post(f"{API}/assets/", "{}", content_type="application/json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]


def test_it_lets_a_user_without_permissions_read_but_not_write(reader: ApiUser) -> None:
    f = fleet(reader.persona)
    assert reader.get(f"/devices/{f.device.logical_identifier}/").status_code == 200
    assert reader.get(f"/alerts/{f.alert.pk}/").status_code == 200
    for response in (
        reader.patch(f"/devices/{f.device.logical_identifier}/", {"name": "x"}),
        reader.post("/devices/", {"logical_id": unique_id("DEV"), "name": "x", "type": f.device.device_type.name}),
        reader.patch(f"/assets/{f.asset.pk}/", {"location": "x"}),
        reader.post(f"/alerts/{f.alert.pk}/acknowledge/"),
    ):
        assert response.status_code == 403, response.content
        assert response["Content-Type"] == "application/problem+json"


def test_it_is_not_on_the_public_site(reader: ApiUser) -> None:
    response = reader.client(host="unknown.example").get(f"{API}/devices/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/problem+json"


# --------------------------------------------------------------------------- tenant isolation


def endpoints(f: Fleet) -> list[tuple[str, str, Any]]:
    """Every endpoint that names an object, with the request that reaches it."""
    device, asset, alert = f.device.logical_identifier, f.asset.pk, f.alert.pk
    return [
        ("get", f"/devices/{device}/", None),
        ("get", f"/devices/{device}/latest/", None),
        ("get", f"/devices/{device}/history/?metric=temperature", None),
        ("get", f"/devices/{device}/history/?metric=temperature&bucket=1m", None),
        ("patch", f"/devices/{device}/", {"name": "taken over"}),
        ("put", f"/devices/{device}/", {"logical_id": device, "name": "x", "type": f.device.device_type.name}),
        ("get", f"/assets/{asset}/", None),
        ("get", f"/assets/{asset}/health/", None),
        ("patch", f"/assets/{asset}/", {"name": "taken over"}),
        ("get", f"/alerts/{alert}/", None),
        ("post", f"/alerts/{alert}/acknowledge/", None),
        ("post", f"/alerts/{alert}/resolve/", None),
    ]


def call(client: Client, method: str, path: str, body: Any) -> Any:
    send: Callable[..., Any] = getattr(client, method)
    if body is None:
        return send(API + path)
    return send(API + path, json.dumps(body), content_type="application/json")


def test_it_answers_404_for_every_object_of_another_tenant(writer: ApiUser, outsider: ApiUser) -> None:
    f = fleet(writer.persona)
    for method, path, body in endpoints(f):
        response = call(outsider.client(), method, path, body)
        assert response.status_code == 404, (method, path, response.content)
        assert response["Content-Type"] == "application/problem+json"
    # The lists do not show them either.
    assert outsider.get("/devices/").json()["results"] == []
    assert f.asset.pk not in [a["id"] for a in outsider.get("/assets/").json()["results"]]
    assert f.alert.pk not in [a["id"] for a in outsider.get("/alerts/").json()["results"]]
    # Nothing changed, and the owner still reaches every one.
    with schema_context(writer.persona.schema):
        f.alert.refresh_from_db()
        assert f.alert.status == AlertStatus.OPEN
        assert Device.objects.get(pk=f.device.pk).name == "test device"
    for method, path, body in endpoints(f)[:4]:
        assert call(writer.client(), method, path, body).status_code == 200, path


def test_it_refuses_a_token_on_another_tenants_host(writer: ApiUser, outsider: ApiUser) -> None:
    response = writer.client(host=outsider.persona.host).get(f"{API}/devices/")
    assert response.status_code == 401
    assert response.json()["type"] == "urn:argus:problem:authentication_failed"


# --------------------------------------------------------------------------- devices


def test_it_filters_devices_by_type_gateway_and_last_seen(reader: ApiUser) -> None:
    now = timezone.now()
    with schema_context(reader.persona.schema):
        gateway_type = make_device_type(processing_mode="gateway")
        gateway = make_device(gateway_type, device_role=DeviceRole.GATEWAY)
        child = make_device(gateway_type, device_role=DeviceRole.CHILD, parent_device=gateway, last_seen=now)
        make_device(gateway_type, last_seen=now - timedelta(days=2))
    by_type = reader.get("/devices/", type=gateway_type.name).json()["results"]
    assert len(by_type) == 3
    children = reader.get("/devices/", gateway=gateway.logical_identifier).json()["results"]
    assert [d["logical_id"] for d in children] == [child.logical_identifier]
    assert children[0]["gateway"] == gateway.logical_identifier
    recent = reader.get("/devices/", type=gateway_type.name, last_seen_after=(now - timedelta(hours=1)).isoformat())
    assert [d["logical_id"] for d in recent.json()["results"]] == [child.logical_identifier]
    never = reader.get("/devices/", type=gateway_type.name, never_seen="true").json()["results"]
    assert [d["logical_id"] for d in never] == [gateway.logical_identifier]


def test_it_pages_device_lists_by_cursor_with_a_bounded_size(reader: ApiUser, settings: Any) -> None:
    settings.ARGUS_API_MAX_PAGE_SIZE = 3
    with schema_context(reader.persona.schema):
        device_type = make_device_type()
        made = sorted(make_device(device_type).logical_identifier for _ in range(7))
    seen: list[str] = []
    response = reader.get("/devices/", type=device_type.name, limit=1000).json()
    while True:
        assert len(response["results"]) <= 3
        seen += [d["logical_id"] for d in response["results"]]
        if response["next"] is None:
            break
        response = reader.client().get(response["next"]).json()
    assert seen == made


def test_it_gives_the_latest_value_of_each_metric_by_device_time(reader: ApiUser) -> None:
    now = timezone.now()
    with schema_context(reader.persona.schema):
        device = make_device(make_device_type())
        # Stored last, but older in device time: a back-filled reading is not the latest.
        readings(device, "temperature", [(now - timedelta(minutes=1), 21.0)])
        readings(device, "temperature", [(now - timedelta(hours=30), 5.0)])
        readings(device, "humidity", [(now - timedelta(days=3), 40.0)])
    body = reader.get(f"/devices/{device.logical_identifier}/latest/").json()
    assert body["device"] == device.logical_identifier
    assert body["metrics"]["temperature"]["value"] == 21.0
    assert datetime.fromisoformat(body["metrics"]["temperature"]["time"]) == now - timedelta(minutes=1)
    assert body["metrics"]["humidity"]["value"] == 40.0


def test_it_aggregates_history_as_sql_does(reader: ApiUser) -> None:
    rng = random.Random(12)
    end = timezone.now().replace(second=0, microsecond=0)
    start = end - timedelta(hours=3)
    points = sorted({start + timedelta(seconds=rng.randrange(0, 3 * 3600)) for _ in range(2000)})
    with schema_context(reader.persona.schema):
        device = make_device(make_device_type())
        readings(device, "temperature", [(t, rng.uniform(-20, 40)) for t in points])
        readings(device, "temperature", [(start - timedelta(minutes=1), 1000.0), (end, 1000.0)])  # outside
        for bucket, width in (("1m", "1 minute"), ("5m", "5 minutes"), ("1h", "1 hour")):
            body = reader.get(
                f"/devices/{device.logical_identifier}/history/",
                metric="temperature",
                start=start.isoformat(),
                end=end.isoformat(),
                bucket=bucket,
            ).json()
            with connection.cursor() as cursor:
                cursor.execute(
                    f"""SELECT date_bin(interval '{width}', time, timestamptz '2000-01-01'), avg(value),
                               min(value), max(value), count(*)
                        FROM telemetry_history WHERE device_id = %s AND metric = 'temperature'
                        AND time >= %s AND time < %s GROUP BY 1 ORDER BY 1""",
                    [device.pk, start, end],
                )
                expected = cursor.fetchall()
            got = [
                (datetime.fromisoformat(b["time"]), b["avg"], b["min"], b["max"], b["count"]) for b in body["buckets"]
            ]
            assert len(got) == len(expected) > 0
            for g, e in zip(got, expected, strict=True):
                assert g[0] == e[0] and g[4] == e[4]
                assert g[1] == pytest.approx(e[1]) and g[2] == e[2] and g[3] == e[3]
            assert sum(b["count"] for b in body["buckets"]) == len(points)


def test_it_pages_raw_points_by_cursor_over_one_range(reader: ApiUser) -> None:
    now = timezone.now()
    with schema_context(reader.persona.schema):
        device = make_device(make_device_type())
        readings(device, "temperature", [(now - timedelta(seconds=s), float(s)) for s in range(1, 26)])
    path = f"{API}/devices/{device.logical_identifier}/history/"
    response = reader.client().get(path, {"metric": "temperature", "limit": "10"}).json()
    values: list[float] = []
    pages = 0
    while True:
        pages += 1
        values += [p["value"] for p in response["points"]]
        if response["next"] is None:
            break
        response = reader.client().get(response["next"]).json()
    assert pages == 3
    assert values == [float(s) for s in range(25, 0, -1)]  # oldest first, each once


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "metric"),
        ({"metric": "temperature", "bucket": "7m"}, "bucket"),
        ({"metric": "temperature", "start": "2026-12-02T00:00:00Z", "end": "2026-12-01T00:00:00Z"}, "start"),
        ({"metric": "temperature", "start": "2025-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "start"),
        (
            {"metric": "temperature", "start": "2025-01-01T00:00:00Z", "end": "2026-01-01T00:00:00Z", "bucket": "1m"},
            "start",
        ),
        ({"metric": "temperature", "cursor": "not-ours!"}, "cursor"),
        ({"metric": "temperature", "start": "yesterday"}, "start"),
    ],
)
def test_it_refuses_unbounded_or_malformed_history_requests(
    reader: ApiUser, params: dict[str, str], field: str
) -> None:
    with schema_context(reader.persona.schema):
        device = make_device(make_device_type())
    response = reader.get(f"/devices/{device.logical_identifier}/history/", **params)
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    errors = response.json()["errors"]
    assert field in errors or field in json.dumps(errors), errors


def test_it_creates_and_updates_devices_as_the_admin_would(writer: ApiUser, outsider: ApiUser) -> None:
    with schema_context(writer.persona.schema):
        type_name = make_device_type().name
    logical_id = unique_id("DEV")
    created = writer.post("/devices/", {"logical_id": logical_id, "name": "Pump 7", "type": type_name})
    assert created.status_code == 201, created.content
    assert created.json()["role"] == "standalone"
    changed = writer.patch(f"/devices/{logical_id}/", {"name": "Pump 7b", "metadata": {"room": "B2"}})
    assert changed.status_code == 200 and changed.json()["metadata"] == {"room": "B2"}
    # Logical ids are unique across the platform: another tenant cannot take this one.
    with schema_context(outsider.persona.schema):
        outsider_type = make_device_type().name
    taken = outsider.post("/devices/", {"logical_id": logical_id, "name": "x", "type": outsider_type})
    assert taken.status_code == 400
    assert "logical_id" in taken.json()["errors"]


@pytest.mark.parametrize(
    "body",
    [
        {"role": "child"},  # a child needs its gateway
        {"logical_id": "has space"},
        {"logical_id": "argus-bridge"},  # a platform service's name
        {"metadata": {"k": "x" * 20_000}},
        {"metadata": {"k": "nul\u0000"}},
        {"metadata": ["not", "an", "object"]},
        {"name": "nul\u0000"},
        {"type": "no such type"},
        {"gateway": "NO-SUCH-GATEWAY"},
        {"gateway": "nul\u0000", "type": "nul\u0000"},
        {"logical_id": "\udaa3\udc1cnul\u0000"},
        {"gateway": "\udb9f\udefe"},
    ],
)
def test_it_refuses_a_bad_device_with_a_problem(writer: ApiUser, body: dict[str, Any]) -> None:
    with schema_context(writer.persona.schema):
        type_name = make_device_type().name
    response = writer.post("/devices/", {"logical_id": unique_id("DEV"), "name": "ok", "type": type_name, **body})
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["errors"]


def test_it_refuses_json_nested_beyond_what_it_parses_with_400(writer: ApiUser) -> None:
    deep = "[" * 5000 + "]" * 5000
    response = writer.client().post(f"{API}/devices/", deep, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["type"] == "urn:argus:problem:parse_error"


# --------------------------------------------------------------------------- assets and alerts


def test_it_shows_assets_with_health_and_transformed_latest_values(reader: ApiUser) -> None:
    f = fleet(reader.persona)
    body = reader.get(f"/assets/{f.asset.pk}/").json()
    assert body["health"]["score"] == 80.0
    assert body["devices"] == [f.device.logical_identifier]
    # The device's 20 °C under the asset's name, through the asset type's linear transformation.
    assert body["latest"]["temp_f"]["value"] == pytest.approx(20.0 * 1.8 + 32)
    assert body["latest"]["temp_f"]["device"] == f.device.logical_identifier


def test_it_reads_a_page_of_assets_in_a_fixed_number_of_queries(reader: ApiUser) -> None:
    for _ in range(2):
        fleet(reader.persona)
    client = reader.client()
    with CaptureQueriesContext(connection) as few:
        assert client.get(f"{API}/assets/").status_code == 200
    for _ in range(6):
        fleet(reader.persona)
    with CaptureQueriesContext(connection) as many:
        assert len(client.get(f"{API}/assets/", {"limit": 100}).json()["results"]) >= 8
    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]


def test_it_gives_an_assets_health_history_in_range(reader: ApiUser) -> None:
    f = fleet(reader.persona)
    now = timezone.now()
    with schema_context(reader.persona.schema):
        AssetHealthScore.objects.create(
            asset=f.asset, time=now - timedelta(days=3), score=10, algorithm="threshold", version=2, explanation={}
        )
    body = reader.get(f"/assets/{f.asset.pk}/health/").json()
    assert [s["score"] for s in body["scores"]] == [80.0]
    wider = reader.get(f"/assets/{f.asset.pk}/health/", start=(now - timedelta(days=4)).isoformat()).json()
    assert [s["score"] for s in wider["scores"]] == [10.0, 80.0]
    too_wide = reader.get(f"/assets/{f.asset.pk}/health/", start=(now - timedelta(days=400)).isoformat())
    assert too_wide.status_code == 400


def test_it_filters_alerts_and_acknowledges_then_resolves_them(writer: ApiUser) -> None:
    f = fleet(writer.persona)
    listed = writer.get("/alerts/", status="open", asset=f.asset.pk).json()["results"]
    assert [a["id"] for a in listed] == [f.alert.pk]
    assert listed[0]["rule"]["condition"] == "temp_f greater than 60"
    assert writer.get("/alerts/", status="resolved", asset=f.asset.pk).json()["results"] == []
    assert writer.get("/alerts/", severity="critical", asset=f.asset.pk).json()["results"] == []

    acked = writer.post(f"/alerts/{f.alert.pk}/acknowledge/")
    assert acked.status_code == 200, acked.content
    assert acked.json()["status"] == "acknowledged"
    assert acked.json()["acknowledged_by"] == writer.username
    again = writer.post(f"/alerts/{f.alert.pk}/acknowledge/")
    assert again.status_code == 409
    assert again.json()["type"] == "urn:argus:problem:alert_state"

    resolved = writer.post(f"/alerts/{f.alert.pk}/resolve/")
    assert resolved.status_code == 200
    assert resolved.json()["status"] == "resolved"
    assert resolved.json()["resolution"] == "manual"
    assert resolved.json()["resolved_by"] == writer.username
    assert writer.post(f"/alerts/{f.alert.pk}/resolve/").status_code == 409


def test_it_creates_and_renames_assets(writer: ApiUser) -> None:
    with schema_context(writer.persona.schema):
        type_name = AssetType.objects.create(name=unique_id("asset-type")).name
    name = unique_id("asset")
    created = writer.post("/assets/", {"name": name, "type": type_name, "location": "Hall 2"})
    assert created.status_code == 201, created.content
    renamed = writer.patch(f"/assets/{created.json()['id']}/", {"name": name + "-b"})
    assert renamed.status_code == 200 and renamed.json()["name"] == name + "-b"
    duplicate = writer.post("/assets/", {"name": name + "-b", "type": type_name})
    assert duplicate.status_code == 400


def test_it_documents_every_endpoint_with_its_problems(reader: ApiUser) -> None:
    schema = Client(HTTP_HOST=reader.persona.host).get("/api/schema/?format=json").json()
    paths = schema["paths"]
    for path in (
        "/api/v1/devices/",
        "/api/v1/devices/{logical_id}/",
        "/api/v1/devices/{logical_id}/latest/",
        "/api/v1/devices/{logical_id}/history/",
        "/api/v1/assets/",
        "/api/v1/assets/{id}/",
        "/api/v1/assets/{id}/health/",
        "/api/v1/alerts/",
        "/api/v1/alerts/{id}/",
        "/api/v1/alerts/{id}/acknowledge/",
        "/api/v1/alerts/{id}/resolve/",
    ):
        assert path in paths, path
        for operation in paths[path].values():
            assert {"401", "404"} <= set(operation["responses"]), (path, operation["responses"].keys())
            assert "application/problem+json" in operation["responses"]["404"]["content"]


@pytest.mark.parametrize(
    "path,params",
    [
        ("/devices/", {"last_seen_before": "9999-12-31T23:59:59-23:59"}),
        ("/devices/", {"last_seen_after": "0001-01-01T00:00:00+01:00"}),
        ("/alerts/", {"raised_after": "0001-01-01T00:00:00+23:59"}),
        ("/alerts/", {"raised_before": "9999-12-31T23:59:59.999999-00:01"}),
        ("/assets/", {"health_below": "1e400"}),
        ("/assets/", {"health_below": "NaN"}),
    ],
)
def test_it_refuses_filter_values_the_database_cannot_compare_with_400(
    reader: ApiUser, path: str, params: dict[str, str]
) -> None:
    response = reader.get(path, **params)
    assert response.status_code == 400, response.content
    assert response["Content-Type"] == "application/problem+json"
    assert set(params) & set(response.json()["errors"]), response.json()


def test_it_compares_times_with_any_offset_python_accepts_in_utc(reader: ApiUser) -> None:
    with schema_context(reader.persona.schema):
        device_type = make_device_type()
        seen = make_device(device_type, last_seen=datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    # 2026-12-01T12:00Z is 2026-12-02T07:55 at +19:55, beyond PostgreSQL's own offsets.
    after = reader.get("/devices/", type=device_type.name, last_seen_after="2026-12-02T07:54:00+19:55").json()
    before = reader.get("/devices/", type=device_type.name, last_seen_before="2026-12-02T07:55:00+19:55").json()
    assert [d["logical_id"] for d in after["results"]] == [seen.logical_identifier]
    assert before["results"] == []
    ancient = reader.get("/devices/", last_seen_after="0071-09-21T14:50:16.276805+19:55", never_seen="true")
    assert ancient.status_code == 200, ancient.content


@pytest.mark.parametrize("params", [{"asset": "99999999999999999999"}, {"rule": "-99999999999999999999"}])
def test_it_finds_nothing_for_ids_beyond_bigint(reader: ApiUser, params: dict[str, str]) -> None:
    response = reader.get("/alerts/", **params)
    assert response.status_code == 200, response.content
    assert response.json()["results"] == []
